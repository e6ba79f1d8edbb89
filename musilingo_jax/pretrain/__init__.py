"""MERT-style self-supervised pretraining of our Flax MERT (docs/pretraining.md).

  targets.py     acoustic teacher: log-mel / MFCC / chroma frames -> k-means codes, log-CQT frames, at the
                 encoder's frame rate; prepared once into ArrayRecord shards beside their codebooks
  model.py       `MERTPretrainHeads` (codebook logits, CQT regression) and `MERTPretrainer` (encoder + heads:
                 span masking, the masked-prediction + CQT + feature-penalty loss)
  data.py        `PretrainData`: the Grain pipeline over the prepared shards (random frame-aligned crops,
                 resumable), the trainer's data interface
  probe.py       linear probes (instrument, key, tempo class) on an encoder's pooled features
  experiment.py  `PretrainExperiment`: what `trainer.run` drives when `config.task = "mert_pretrain"`
  demo.py        the demo's pretrained encoder: unlabeled music21 renderings -> targets -> pretraining ->
                 a converted encoder directory in the cache, keyed by its settings
"""
