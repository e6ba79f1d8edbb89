"""Hugging Face PyTorch / GGUF checkpoints <-> our Flax NNX models, and our own converted format.

A model module (models/mert.py, models/llama.py) declares its key table `HF_KEY_RULES` and a `ModelKind`
(`HF_KIND`: model class, config class, rules, the HF model types it reads); callers hand that kind to the
functions here, so this package never imports the models. Submodules, leaf first (each imports only those
above it):

  rules      ConversionError, KeyRule, the layout Transforms (IDENTITY, LINEAR, CONV1D), ModelKind,
             llama.cpp's q/k permutation. stdlib + numpy only: the models import it.
  readers    TensorSource and open_source: safetensors (single or sharded), torch .bin, GGUF; read_gguf_layout.
  state      NNX state plumbing: base-parameter filter, flat paths, abstract models, target shardings.
  hf         import_model / import_pretrained (streaming, sharded), load_hf_tensors (in memory),
             iter_hf_tensors / export_hf_tensors / export_hf / export_pretrained, SafetensorsWriter.
  converted  convert_checkpoint -> OUT/params/<part> (Orbax) + configs + meta.json; load_converted
             restores onto any device count / mesh.
  pth        MusiLingo's own .pth (the trainable projection): save_musilingo_pth / load_musilingo_pth.

This file imports nothing, so `from musilingo_jax.convert import rules` loads rules alone.
"""
