"""A full-size rehearsal of the user's command chain, on random checkpoints with the real shapes.

  python scripts/rehearse.py --out /tmp/rehearsal --llm-layers 4      # MERT-v1-330M + a 7B-wide LLM
  python scripts/rehearse.py --small --out /tmp/rehearsal-small        # tiny dimensions (the test)

Writes, under OUT (deleted at the end unless --keep):
  hf/MERT-v1-330M/   a MERT-v1-330M-shaped checkpoint: config.json (model_type mert_model, pre-LN, GroupNorm
                     feature extractor, 512-channel convs) + model.safetensors, float32, random weights,
                     the positional conv in the legacy weight_g/weight_v spelling the released file uses;
  hf/vicuna-7b/      a Vicuna-7B-v0-shaped LLaMA: hidden 4096, FFN 11008, 32 heads, vocab 32001, untied
                     lm_head, RMSNorm eps 1e-6, bfloat16, sharded safetensors with model.safetensors.index.json,
                     --llm-layers of its 32 layers; the real LLaMA SentencePiece tokenizer.model plus
                     tokenizer_config.json, special_tokens_map.json and added_tokens.json ([PAD] = 32000);
  MusicQA/           {Finetune,Eval}MusicQA.json + audios/: a dozen synthesized 20-30 s clips at 16, 44.1 and
                     48 kHz (mono and stereo), so the 372,000-native-sample crop gives different lengths;
then runs, each as its own subprocess and exactly as the README shows them: scripts/convert_hf.py,
scripts/verify_conversion.py, scripts/precompute.py (--encoder ... --features also) for Finetune and Eval,
scripts/train.py --config configs/finetune.py:musicqa for 2 optimizer steps (batch 2, accum 2),
scripts/evaluate.py, scripts/generate.py, scripts/export_pytorch.py, and a transformers reload of the export
(LlamaForCausalLM and HubertModel from the exported directories, one forward each, the exported tensors
compared with the inputs). At full size a last stage, compiled_memory, has XLA compile (not run) the train
step and a bfloat16 LLM forward at --llm-layers and at all 32 layers on this backend and reports their
memory: the basis of the report's labelled extrapolation to 32 layers.

--small: MERT and LLaMA a few dozen wide (2 layers each; the real tokenizer, vocab 32001), 3 clips, and the
cheap settings of the two slowest stages (no generation samples in train, evaluate --no-bertscore).

Prints a table (stage, status, wall and CPU time, peak RSS of the stage's process tree, the machine's peak
memory in use, output size on disk) and writes it to --report (markdown) and JSON beside it; hand-written
notes below the report's notes line are kept. A stage whose process tree passes --max-rss-gib, or that
leaves the machine less than --min-available-gib, is killed (the machine may be shared). Exits 1 when a
stage failed; the stages that need it are skipped.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the checkout: the stages run scripts/*.py from here
GIB = 1 << 30

# The LLaMA-7B (Vicuna-7B v0) shape, and MERT-v1-330M's.
LLM_FULL = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                vocab_size=32001, num_hidden_layers=32)
LLM_SMALL = dict(hidden_size=64, intermediate_size=172, num_attention_heads=4, num_key_value_heads=4,
                 vocab_size=32001, num_hidden_layers=2)
MERT_FULL = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                 conv_dim=[512] * 7, num_conv_pos_embeddings=128, num_conv_pos_embedding_groups=16)
MERT_SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                  conv_dim=[16] * 7, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4)

# (sample rate, seconds, channels) of the clips; the first eight are the Finetune split, the rest Eval.
CLIPS_FULL = [(16000, 28.0, 1), (44100, 24.0, 2), (48000, 21.0, 1), (16000, 20.0, 2),
              (44100, 29.5, 1), (48000, 26.0, 2), (16000, 25.0, 1), (44100, 22.0, 1),
              (16000, 21.5, 1), (44100, 27.0, 1), (48000, 23.0, 2), (48000, 30.0, 1)]
CLIPS_SMALL = [(16000, 20.0, 1), (44100, 22.0, 2), (48000, 21.0, 1)]

QUESTIONS = [
    ("What is the mood of this piece?", "The piece sounds calm and reflective, with a slow, steady pulse."),
    ("Which instruments can you hear?", "A sustained synthesizer tone over soft noise, like a pad with wind."),
    ("Describe the tempo of the music.", "The tempo is slow, around sixty beats per minute."),
    ("What genre would this music belong to?", "It is ambient electronic music."),
    ("Is there any singing in this recording?", "No, the recording is purely instrumental."),
    ("What key is the music in?", "The drone centres on A, so the music is in A minor."),
]


# ------------------------------------------------------------------------------------------------------------
# Inputs


def _torch_randn(shape, gen, std, dtype):
  import torch
  return (torch.randn(shape, generator=gen, dtype=torch.float32) * std).to(dtype)


def _init_tensor(name: str, shape, gen, dtype):
  """A plausible random value for an HF tensor: norms near 1, biases near 0, weights ~ N(0, 0.02) (convs
  He-scaled, so the GELU stack keeps its scale)."""
  import torch
  if name.endswith("masked_spec_embed"):
    return torch.rand(shape, generator=gen).to(dtype)
  if "norm" in name and name.endswith("weight"):
    return (1.0 + _torch_randn(shape, gen, 0.1, torch.float32)).to(dtype)
  if name.endswith("bias"):
    return _torch_randn(shape, gen, 0.02, dtype)
  if name.endswith("weight_g"):
    return (1.0 + _torch_randn(shape, gen, 0.1, torch.float32).abs()).to(dtype)
  if "conv_layers" in name:
    fan_in = int(math.prod(shape[1:]))
    return _torch_randn(shape, gen, math.sqrt(2.0 / fan_in), dtype)
  return _torch_randn(shape, gen, 0.02, dtype)


def _meta_state(model_cls, config) -> dict:
  """{name: shape} of an HF model's state dict, without allocating it."""
  import torch
  with torch.device("meta"):
    model = model_cls(config)
  return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def write_mert(out: Path, dims: dict, seed: int) -> None:
  """A MERT-v1-330M-layout checkpoint (config.json as the released one spells it, one float32 safetensors)."""
  import safetensors.torch
  import torch
  import transformers
  out.mkdir(parents=True, exist_ok=True)
  cfg = dict(
      architectures=["MERTModel"], model_type="mert_model",
      auto_map={"AutoConfig": "configuration_MERT.MERTConfig", "AutoModel": "modeling_MERT.MERTModel"},
      hidden_size=dims["hidden_size"], num_hidden_layers=dims["num_hidden_layers"],
      num_attention_heads=dims["num_attention_heads"], intermediate_size=dims["intermediate_size"],
      hidden_act="gelu", feat_extract_activation="gelu", feat_extract_norm="group", conv_bias=False,
      conv_dim=dims["conv_dim"], conv_kernel=[10, 3, 3, 3, 3, 2, 2], conv_stride=[5, 2, 2, 2, 2, 2, 2],
      num_feat_extract_layers=7, num_conv_pos_embeddings=dims["num_conv_pos_embeddings"],
      num_conv_pos_embedding_groups=dims["num_conv_pos_embedding_groups"], conv_pos_batch_norm=False,
      do_stable_layer_norm=True, layer_norm_eps=1e-5, feat_proj_layer_norm=True, feat_proj_dropout=0.0,
      apply_spec_augment=True, mask_time_prob=0.075, mask_time_length=10, mask_time_min_masks=2,
      mask_feature_prob=0.0, mask_feature_length=10, mask_feature_min_masks=0, feature_extractor_cqt=False,
      feature_extractor_cqt_bins=336, deepnorm=False, attention_relax=-1.0, hidden_dropout=0.1,
      attention_dropout=0.1, activation_dropout=0.0, layerdrop=0.1, initializer_range=0.02,
      sample_rate=24000, vocab_size=32, pad_token_id=0, bos_token_id=1, eos_token_id=2,
      torch_dtype="float32", transformers_version="4.28.1")
  (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
  hf_keys = {k: v for k, v in cfg.items() if k not in ("auto_map", "architectures", "model_type")}
  shapes = _meta_state(transformers.HubertModel, transformers.HubertConfig(**hf_keys))
  gen = torch.Generator().manual_seed(seed)
  tensors = {}
  for name, shape in shapes.items():  # the released checkpoint spells the weight norm the legacy way
    name = name.replace("parametrizations.weight.original0", "weight_g").replace(
        "parametrizations.weight.original1", "weight_v")
    tensors[name] = _init_tensor(name, shape, gen, torch.float32).contiguous()
  safetensors.torch.save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
  (out / "preprocessor_config.json").write_text(json.dumps(
      {"do_normalize": False, "feature_extractor_type": "Wav2Vec2FeatureExtractor", "feature_size": 1,
       "padding_side": "right", "padding_value": 0, "return_attention_mask": True, "sampling_rate": 24000},
      indent=2) + "\n")


def write_llm(out: Path, dims: dict, seed: int, *, shard_bytes: int) -> None:
  """A Vicuna-7B-v0-layout LLaMA: config.json, bfloat16 sharded safetensors + index, tokenizer files."""
  import safetensors.torch
  import torch
  import transformers
  from musilingo_jax import assets
  out.mkdir(parents=True, exist_ok=True)
  cfg = dict(architectures=["LlamaForCausalLM"], model_type="llama", bos_token_id=1, eos_token_id=2,
             pad_token_id=0, hidden_act="silu", initializer_range=0.02, max_position_embeddings=2048,
             max_sequence_length=2048, rms_norm_eps=1e-6, tie_word_embeddings=False, torch_dtype="bfloat16",
             transformers_version="4.28.0.dev0", use_cache=True, **dims)
  (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
  (out / "generation_config.json").write_text(json.dumps(
      {"_from_model_config": True, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
       "transformers_version": "4.28.0.dev0"}, indent=2) + "\n")
  hc = transformers.LlamaConfig(**{k: v for k, v in cfg.items() if k not in ("architectures", "model_type")})
  shapes = _meta_state(transformers.LlamaForCausalLM, hc)
  # Shards in state-dict order, each at most shard_bytes (one tensor may exceed it alone), as save_pretrained.
  groups, cur, size = [], [], 0
  for name, shape in shapes.items():
    n = int(math.prod(shape)) * 2
    if cur and size + n > shard_bytes:
      groups.append(cur)
      cur, size = [], 0
    cur.append(name)
    size += n
  groups.append(cur)
  if len(groups) < 2:  # always exercise the index
    half = max(1, len(cur) // 2)
    groups = [cur[:half], cur[half:]]
  gen = torch.Generator().manual_seed(seed)
  weight_map, total = {}, 0
  for j, names in enumerate(groups):
    fname = f"model-{j + 1:05d}-of-{len(groups):05d}.safetensors"
    part = {k: _init_tensor(k, shapes[k], gen, torch.bfloat16).contiguous() for k in names}
    safetensors.torch.save_file(part, str(out / fname), metadata={"format": "pt"})
    total += sum(t.numel() * t.element_size() for t in part.values())
    weight_map.update(dict.fromkeys(names, fname))
    del part
  (out / "model.safetensors.index.json").write_text(json.dumps(
      {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
  # The tokenizer files of a Vicuna-7B v0 directory: the LLaMA SentencePiece model + [PAD] as id 32000.
  shutil.copyfile(assets.llama_tokenizer_model(), out / "tokenizer.model")

  def added(s):
    return {"__type": "AddedToken", "content": s, "lstrip": False, "normalized": True, "rstrip": False,
            "single_word": False}
  (out / "tokenizer_config.json").write_text(json.dumps(
      {"add_bos_token": True, "add_eos_token": False, "bos_token": added("<s>"),
       "clean_up_tokenization_spaces": False, "eos_token": added("</s>"), "model_max_length": 2048,
       "pad_token": None, "sp_model_kwargs": {}, "tokenizer_class": "LlamaTokenizer",
       "unk_token": added("<unk>")}, indent=2) + "\n")
  (out / "special_tokens_map.json").write_text(json.dumps(
      {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "[PAD]", "unk_token": "<unk>"}, indent=2) + "\n")
  (out / "added_tokens.json").write_text(json.dumps({"[PAD]": 32000}, indent=2) + "\n")


def _clip(rate: int, seconds: float, channels: int, rng) -> "np.ndarray":
  """A synthesized clip: a few decaying tones on a slow beat, plus a little noise."""
  import numpy as np
  n = int(rate * seconds)
  t = np.arange(n, dtype=np.float64) / rate
  bpm = rng.uniform(60, 140)
  beat = (t * bpm / 60.0) % 1.0
  env = np.exp(-4.0 * beat)
  f0 = 110.0 * 2 ** (rng.integers(0, 24) / 12)
  x = sum(np.sin(2 * np.pi * f0 * h * t + rng.uniform(0, 2 * np.pi)) / h for h in (1, 2, 3, 5))
  x = 0.25 * env * x + 0.02 * rng.standard_normal(n)
  if channels == 2:
    x = np.stack([x, 0.8 * x + 0.01 * rng.standard_normal(n)], axis=1)
  return (x / max(1.0, np.abs(x).max() * 1.05)).astype(np.float32)


def write_musicqa(root: Path, clips, *, n_train: int, seed: int) -> dict:
  """MusicQA/{Finetune,Eval}MusicQA.json + MusicQA/audios/NNNNNN.wav (16-bit PCM). One two-turn
  conversation in Finetune exercises the multi-turn reader."""
  import numpy as np
  import soundfile as sf
  rng = np.random.default_rng(seed)
  audios = root / "MusicQA" / "audios"
  audios.mkdir(parents=True, exist_ok=True)
  splits = {"Finetune": [], "Eval": []}
  for i, (rate, seconds, channels) in enumerate(clips):
    name = f"{i:06d}.wav"
    sf.write(str(audios / name), _clip(rate, seconds, channels, rng), rate, subtype="PCM_16")
    split = "Finetune" if i < n_train else "Eval"
    q, a = QUESTIONS[i % len(QUESTIONS)]
    conv = [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
    if split == "Finetune" and i == 1:
      q2, a2 = QUESTIONS[(i + 3) % len(QUESTIONS)]
      conv += [{"from": "human", "value": q2}, {"from": "gpt", "value": a2}]
    splits[split].append({"audio_name": name, "conversation": conv})
  if not splits["Eval"]:  # --small: evaluate on the training clips
    splits["Eval"] = [{"audio_name": e["audio_name"], "conversation": e["conversation"][:2]}
                      for e in splits["Finetune"]]
  for split, entries in splits.items():
    (root / "MusicQA" / f"{split}MusicQA.json").write_text(json.dumps(entries, indent=1) + "\n")
  return {s: len(e) for s, e in splits.items()}


def make_inputs(args) -> None:
  """The hidden --make-inputs stage: every input a user would have downloaded."""
  work = Path(args.out)
  mert_dims = dict(MERT_SMALL if args.small else MERT_FULL)
  llm_dims = dict(LLM_SMALL if args.small else LLM_FULL)
  mert_dims["num_hidden_layers"] = args.encoder_layers
  llm_dims["num_hidden_layers"] = args.llm_layers
  t = time.time()
  write_mert(work / "hf" / "MERT-v1-330M", mert_dims, seed=1)
  print(f"inputs: MERT ({mert_dims['num_hidden_layers']} layers) in {time.time() - t:.1f} s", flush=True)
  t = time.time()
  write_llm(work / "hf" / "vicuna-7b", llm_dims, seed=2, shard_bytes=(1 << 20) if args.small else 2 * GIB)
  print(f"inputs: LLM ({llm_dims['num_hidden_layers']} layers) in {time.time() - t:.1f} s", flush=True)
  clips = CLIPS_SMALL if args.small else CLIPS_FULL
  counts = write_musicqa(work, clips, n_train=len(clips) if args.small else 8, seed=3)
  print(f"inputs: MusicQA {counts} from {len(clips)} clips", flush=True)


# ------------------------------------------------------------------------------------------------------------
# The transformers reload of the export


def reload_check(args) -> int:
  """The hidden --reload stage: the exported directories through transformers, one forward each, and the
  exported tensors against the inputs (rounded to the export dtype)."""
  import numpy as np
  import safetensors
  import torch
  import transformers
  work = Path(args.out)
  exp = work / "exported"
  ok = True
  dtype = getattr(torch, args.export_dtype)

  sd = torch.load(exp / "musilingo_checkpoint.pth", map_location="cpu", weights_only=True)["model"]
  w, b = sd["llama_proj.weight"], sd["llama_proj.bias"]
  print(f"reload: musilingo_checkpoint.pth llama_proj.weight {tuple(w.shape)} bias {tuple(b.shape)}")

  tok = transformers.AutoTokenizer.from_pretrained(str(exp / "llm"))
  from musilingo_jax.tokenizer import Tokenizer
  ours = Tokenizer.from_dir(work / "converted" / "tokenizer")
  text = "###Human: <Img><ImageHere></Img> What is the mood of this piece?###Assistant: "
  ids_hf = tok(text, add_special_tokens=False)["input_ids"]
  ids_ours = list(ours.encode(text))
  same = ids_hf == ids_ours
  ok &= same
  print(f"reload: AutoTokenizer ({type(tok).__name__}, {len(tok)} tokens) ids == ours: {same}")

  llm = transformers.AutoModelForCausalLM.from_pretrained(str(exp / "llm"), dtype=dtype).eval()
  with torch.no_grad():
    logits = llm(torch.tensor([[ours.bos_id] + ids_ours])).logits
  finite = bool(torch.isfinite(logits).all())
  ok &= finite and logits.shape[-1] == llm.config.vocab_size
  print(f"reload: {type(llm).__name__} ({llm.config.num_hidden_layers} layers) logits {tuple(logits.shape)} "
        f"{logits.dtype} finite: {finite}")
  del llm, logits

  enc = transformers.HubertModel.from_pretrained(str(exp / "encoder"), dtype=dtype).eval()
  wav = torch.from_numpy(np.random.RandomState(0).randn(1, 24000).astype(np.float32)).to(dtype)
  with torch.no_grad():
    out = enc(wav, output_hidden_states=True)
  finite = bool(torch.isfinite(out.last_hidden_state).all())
  ok &= finite
  print(f"reload: HubertModel ({enc.config.num_hidden_layers} layers) last_hidden_state "
        f"{tuple(out.last_hidden_state.shape)}, {len(out.hidden_states)} hidden states, finite: {finite}")
  del enc, out

  def legacy(name):
    return name.replace("parametrizations.weight.original0", "weight_g").replace(
        "parametrizations.weight.original1", "weight_v")

  for role, src in (("llm", work / "hf" / "vicuna-7b"), ("encoder", work / "hf" / "MERT-v1-330M")):
    inputs = {}
    for f in sorted(src.glob("*.safetensors")):
      with safetensors.safe_open(str(f), "pt") as h:
        inputs.update({k: (f, h) for k in h.keys()})
    same = total = 0
    diff_names = []
    for f in sorted((exp / role).glob("*.safetensors")):
      with safetensors.safe_open(str(f), "pt") as h:
        for k in h.keys():
          total += 1
          name = legacy(k)
          if name not in inputs:
            diff_names.append(f"{k} (not in the input)")
            continue
          with safetensors.safe_open(str(inputs[name][0]), "pt") as g:
            a, b = h.get_tensor(k), g.get_tensor(name).to(dtype)
          if a.shape == b.shape and bool(torch.equal(a, b)):
            same += 1
          else:
            diff_names.append(k)
    print(f"reload: exported {role}: {same}/{total} tensors bitwise equal to the input (as {args.export_dtype})"
          + (f"; differ: {diff_names[:4]}" if diff_names else ""))
    ok &= total > 0 and same == total
  print("reload: ok" if ok else "reload: FAILED")
  return 0 if ok else 1


def compiled_memory(args) -> int:
  """The hidden --compiled-memory stage: XLA's memory analysis (arguments + temporaries) on this machine's
  CPU backend of the train stage's jitted step and of a bfloat16 LLM forward (what evaluate/generate run
  for a prefill), at --llm-layers and at all 32 layers. Nothing is allocated: abstract shapes only. Prints
  one JSON line per layer count."""
  import importlib.util
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from musilingo_jax import aot, build
  from musilingo_jax.models.llama import Llama
  spec = importlib.util.spec_from_file_location("_finetune", ROOT / "configs" / "finetune.py")
  finetune = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(finetune)
  preset = build.llm_config
  for layers in sorted({args.llm_layers, LLM_FULL["num_hidden_layers"]}):
    # The vicuna_7b preset with `layers` layers (the rehearsal's checkpoint has that many).
    build.llm_config = lambda name, **o: preset(name, **{**o, "num_hidden_layers": layers})  # noqa: B023
    try:
      c = finetune.get_config("musicqa")
      c.train.batch_size, c.train.accum_steps = 2, 2
      step = aot.compile_step(c, "cpu", devices=jax.devices()[:1])
      cfg = build.preset_llm_config(c)
      gdef, state = nnx.split(nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0))))  # noqa: B023
      fwd = jax.jit(lambda st, ids: nnx.merge(gdef, st)(ids)[0]).lower(  # noqa: B023
          state, jax.ShapeDtypeStruct((2, c.data.max_len), jnp.int32)).compile().memory_analysis()
    finally:
      build.llm_config = preset
    print(json.dumps({"layers": layers, "train_step_bytes": step.total_bytes, "train_temp_bytes": step.temp_bytes,
                      "train_argument_bytes": step.argument_bytes, "forward_argument_bytes": fwd.argument_size_in_bytes,
                      "forward_temp_bytes": fwd.temp_size_in_bytes, "forward_tokens": [2, c.data.max_len]}), flush=True)
  return 0


# ------------------------------------------------------------------------------------------------------------
# Running and measuring the stages


@dataclasses.dataclass
class Stage:
  name: str
  cmd: list[str]
  outputs: list[str]      # paths (relative to the work dir) whose size is reported
  needs: list[str]        # stages that must have succeeded
  env: dict | None = None


@dataclasses.dataclass
class Result:
  stage: str
  status: str = "skipped"
  rc: int | None = None
  wall_s: float = 0.0
  cpu_s: float = 0.0              # user + system CPU time of the stage's process and its waited-for children
  peak_rss_gib: float = 0.0       # polled sum of RSS over the stage's process tree
  maxrss_gib: float = 0.0         # ru_maxrss of the stage's process (its largest single process)
  machine_used_gib: float = 0.0   # peak (total - available) of the whole machine during the stage
  output_bytes: int = 0
  command: str = ""
  log: str = ""
  note: str = ""


def _du(path: Path) -> int:
  if not path.exists():
    return 0
  if path.is_file():
    return path.stat().st_size
  return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def _tree_rss(proc) -> int:
  import psutil
  total = 0
  try:
    procs = [proc] + proc.children(recursive=True)
  except psutil.Error:
    return 0
  for p in procs:
    try:
      total += p.memory_info().rss
    except psutil.Error:
      pass
  return total


def run_stage(stage: Stage, work: Path, args) -> Result:
  import psutil
  res = Result(stage.name, command=" ".join(shlex.quote(c) for c in stage.cmd))
  log_path = work / "logs" / f"{stage.name}.log"
  log_path.parent.mkdir(parents=True, exist_ok=True)
  res.log = str(log_path)
  env = dict(os.environ, PYTHONUNBUFFERED="1", **(stage.env or {}))
  print(f"\n=== {stage.name}: {res.command}", flush=True)
  t0 = time.perf_counter()
  with open(log_path, "w") as log:
    proc = subprocess.Popen(stage.cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)
    ps = psutil.Process(proc.pid)
    peak = used = 0
    killed = ""
    rusage = None
    while True:
      try:
        pid, status, rusage = os.wait4(proc.pid, os.WNOHANG)
      except BaseException:  # Ctrl-C: take the stage's processes down too
        os.killpg(proc.pid, signal.SIGKILL)
        raise
      if pid:
        break
      rss = _tree_rss(ps)
      vm = psutil.virtual_memory()
      peak, used = max(peak, rss), max(used, vm.total - vm.available)
      elapsed = time.perf_counter() - t0
      if not killed:
        if rss > args.max_rss_gib * GIB:
          killed = f"killed: process tree RSS {rss / GIB:.1f} GiB > --max-rss-gib {args.max_rss_gib:g}"
        elif vm.available < args.min_available_gib * GIB:
          killed = (f"killed: machine available memory {vm.available / GIB:.1f} GiB < --min-available-gib "
                    f"{args.min_available_gib:g}")
        elif args.stage_timeout and elapsed > args.stage_timeout:
          killed = f"killed: ran past --stage-timeout {args.stage_timeout:g} s"
        if killed:
          print(f"{stage.name}: {killed}", flush=True)
          os.killpg(proc.pid, signal.SIGKILL)
      try:
        time.sleep(args.poll_s)
      except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    proc.returncode = os.waitstatus_to_exitcode(status)
  res.wall_s = time.perf_counter() - t0
  res.rc = proc.returncode
  res.peak_rss_gib = peak / GIB
  res.maxrss_gib = rusage.ru_maxrss * 1024 / GIB if rusage is not None else 0.0
  res.cpu_s = rusage.ru_utime + rusage.ru_stime if rusage is not None else 0.0
  res.machine_used_gib = used / GIB
  res.output_bytes = sum(_du(work / o) for o in stage.outputs)
  res.status = "ok" if res.rc == 0 and not killed else "FAILED"
  res.note = killed or ("" if res.rc == 0 else f"exit code {res.rc}")
  tail = [line for line in log_path.read_text(errors="replace").replace("\r", "\n").splitlines() if line.strip()]
  shown = tail[-(12 if res.status == "ok" else 40):]
  print("\n".join("  | " + line for line in shown), flush=True)
  print(f"--- {stage.name}: {res.status} in {res.wall_s:.1f} s ({res.cpu_s:.1f} s CPU), peak RSS "
        f"{res.peak_rss_gib:.2f} GiB, machine in use {res.machine_used_gib:.1f} GiB, output "
        f"{_size(res.output_bytes)}", flush=True)
  return res


def build_stages(args, work: Path) -> list[Stage]:
  py = sys.executable
  w = str(work)
  mert, llm = f"{w}/hf/MERT-v1-330M", f"{w}/hf/vicuna-7b"
  conv, rec, run = f"{w}/converted", f"{w}/records/musicqa", f"{w}/runs/musicqa"
  me = [py, str(Path(__file__).resolve())]
  common = ["--out", w, "--llm-layers", str(args.llm_layers), "--encoder-layers", str(args.encoder_layers)]
  common += ["--small"] if args.small else []
  clip = f"{w}/MusicQA/audios/{len(CLIPS_SMALL if args.small else CLIPS_FULL) - 1:06d}.wav"
  gen_tokens = "8"
  stages = [
      Stage("inputs", me + ["--make-inputs"] + common, ["hf", "MusicQA"], []),
      Stage("convert_hf", [py, "scripts/convert_hf.py", "--mert", mert, "--llm", llm, "--out", conv,
                           "--dtype", args.convert_dtype, "--no-progress"], ["converted"], ["inputs"]),
      Stage("verify_conversion", [py, "scripts/verify_conversion.py", "--mert", mert, "--llm", llm],
            [], ["inputs"]),
  ]
  for split in ("Finetune", "Eval"):
    stages.append(Stage(f"precompute_{split}", [
        py, "scripts/precompute.py", "--dataset", "musicqa", "--data-dir", f"{w}/MusicQA", "--split", split,
        "--out", rec, "--encoder", conv, "--features", "also", "--workers", "2", "--no-progress"],
        ["records"], ["convert_hf"]))
  stages += [
      Stage("train", [py, "scripts/train.py", "--config", "configs/finetune.py:musicqa", "--workdir", run,
                      f"--config.model.checkpoint={conv}", f"--config.data.records_dir={rec}",
                      "--config.train.batch_size=2", "--config.train.accum_steps=2", "--config.train.num_steps=2",
                      "--config.log_every=1", "--config.save_every=2", "--config.eval_batches=1",
                      f"--config.eval.generate_samples={0 if args.small else 2}",
                      "--config.eval.max_new_tokens=4"],
            ["runs"], ["precompute_Finetune", "precompute_Eval"]),
      Stage("evaluate", [py, "scripts/evaluate.py", "--workdir", run, "--records", rec, "--split", "Eval",
                         "--out", f"{w}/eval", "--limit", "2" if args.small else "4", "--batch-size", "2", "--greedy",
                         "--max-new-tokens", gen_tokens] + (["--no-bertscore"] if args.small else []),
            ["eval"], ["train"]),
      Stage("generate", [py, "scripts/generate.py", "--workdir", run, "--audio", clip, "--question",
                         "What is the mood of this piece?", "--greedy", "--max-new-tokens", gen_tokens, "--json"],
            [], ["train"]),
      Stage("export_pytorch", [py, "scripts/export_pytorch.py", "--workdir", run, "--out", f"{w}/exported",
                               "--dtype", args.export_dtype], ["exported"], ["train"]),
      Stage("reload_transformers", me + ["--reload", "--export-dtype", args.export_dtype] + common, [],
            ["export_pytorch"]),
  ]
  if not args.small:  # the extrapolation's basis: XLA's own memory analysis at --llm-layers and at 32 layers
    stages.append(Stage("compiled_memory", me + ["--compiled-memory"] + common, [], []))
  return stages


def records_summary(work: Path) -> list[dict]:
  """Per record of the precomputed shards: split, id, source rate, true 24 kHz length and audio tokens."""
  from array_record.python.array_record_module import ArrayRecordReader
  from musilingo_jax.data import records
  rows = []
  for shard in sorted((work / "records" / "musicqa").glob("*.array_record")):
    reader = ArrayRecordReader(str(shard))
    try:
      for i in range(reader.num_records()):
        d = records.decode_record(reader.read([i])[0])
        feats = d.get("features")
        rows.append({"split": d["split"], "id": d["id"], "source_rate": d.get("source_rate"),
                     "audio_len": int(d["audio_len"]), "window": int(len(d["audio"])) if "audio" in d else None,
                     "tokens": int(feats.shape[0]) if feats is not None else None})
    finally:
      reader.close()
  return rows


def tokens_by_rate(rows: list[dict]) -> str:
  by: dict = {}
  for r in rows:
    by.setdefault(r["source_rate"], set()).add(r["tokens"])
  return "; ".join(f"{rate} Hz: {'/'.join(map(str, sorted(t)))} tokens" for rate, t in sorted(by.items()))


STAGE_NAMES = ("inputs", "convert_hf", "verify_conversion", "precompute_Finetune", "precompute_Eval", "train",
               "evaluate", "generate", "export_pytorch", "reload_transformers")
EXTRA_STAGES = ("compiled_memory",)  # full size only: not part of the user's chain


def _size(n: float) -> str:
  for unit, scale in (("GiB", GIB), ("MiB", 1 << 20), ("KiB", 1 << 10)):
    if n >= scale:
      return f"{n / scale:.2f} {unit}" if unit == "GiB" else f"{n / scale:.1f} {unit}"
  return f"{int(n)} B"


def format_table(results: list[Result]) -> str:
  rows = ["| stage | status | wall time | CPU time | peak RSS (process tree) | ru_maxrss | machine in use (peak) "
          "| output on disk |", "|---|---|---:|---:|---:|---:|---:|---:|"]
  for r in results:
    status = r.status + (f" ({r.note})" if r.note else "")
    if r.status == "skipped":
      rows.append(f"| {r.stage} | {status} | - | - | - | - | - | - |")
      continue
    rows.append(f"| {r.stage} | {status} | {r.wall_s:.1f} s | {r.cpu_s:.1f} s | {r.peak_rss_gib:.2f} GiB | "
                f"{r.maxrss_gib:.2f} GiB | {r.machine_used_gib:.1f} GiB | {_size(r.output_bytes)} |")
  return "\n".join(rows)


def llm_params(args) -> int:
  d = LLM_SMALL if args.small else LLM_FULL
  h, f = d["hidden_size"], d["intermediate_size"]
  return args.llm_layers * (4 * h * h + 3 * h * f + 2 * h) + 2 * d["vocab_size"] * h + h


def mert_params(args) -> int:
  d = MERT_SMALL if args.small else MERT_FULL
  h, f, c = d["hidden_size"], d["intermediate_size"], d["conv_dim"][0]
  convs = c * 10 + sum(c * c * k for k in (3, 3, 3, 3, 2, 2))
  pos = h * (h // d["num_conv_pos_embedding_groups"]) * d["num_conv_pos_embeddings"]
  return args.encoder_layers * (4 * h * h + 2 * h * f) + convs + pos + c * h


def disk_needed(args) -> int:
  """Bytes the work directory reaches: the inputs (LLM bfloat16, MERT float32), the converted and the
  exported copies, and ~1 GiB of audio, records and logs."""
  llm, mert = llm_params(args), mert_params(args)
  per = {"float32": 4, "bfloat16": 2}
  return (llm * (2 + per[args.convert_dtype] + per[args.export_dtype])
          + mert * (4 + per[args.convert_dtype] + per[args.export_dtype]) + GIB)


def default_llm_layers(small: bool) -> int:
  """The most LLM layers whose heaviest stage keeps the machine under 75 % of its memory, counting what
  others use now. Measured on a 2-CPU machine at 4 layers (docs/rehearsal.md): verify_conversion peaked at
  13.1 GiB and train at 11.7 GiB; each layer adds ~2.0 GiB to both (verify: two float32 copies plus the
  mapped bfloat16 file; train: XLA's memory analysis of the step), so peak ~ 5.1 + 2.0 x layers GiB."""
  if small:
    return LLM_SMALL["num_hidden_layers"]
  import psutil
  vm = psutil.virtual_memory()
  budget = 0.75 * vm.total - (vm.total - vm.available)
  return max(1, min(LLM_FULL["num_hidden_layers"], int((budget / GIB - 5.1) // 2.0)))


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", default=None, help="work directory (default: a new folder under $TMPDIR)")
  p.add_argument("--llm-layers", type=int, default=None,
                 help="LLM layers of the 32 (default: what the memory available now fits; 2 with --small)")
  p.add_argument("--encoder-layers", type=int, default=None, help="MERT layers (default 24; 2 with --small)")
  p.add_argument("--small", action="store_true", help="tiny MERT/LLaMA dimensions and 3 clips (seconds)")
  p.add_argument("--keep", action="store_true", help="keep the work directory")
  p.add_argument("--report", default=None,
                 help="markdown report path, JSON beside it (default: docs/rehearsal.md; none with --small)")
  p.add_argument("--convert-dtype", default="bfloat16", choices=("float32", "bfloat16"),
                 help="scripts/convert_hf.py --dtype")
  p.add_argument("--export-dtype", default="bfloat16", choices=("float32", "bfloat16"),
                 help="scripts/export_pytorch.py --dtype")
  p.add_argument("--stages", default=None,
                 help=f"comma-separated subset of {','.join(STAGE_NAMES + EXTRA_STAGES)} (rerun them in a kept "
                      "--out; the report keeps the other stages' earlier results)")
  p.add_argument("--max-rss-gib", type=float, default=18.0, help="kill a stage whose process tree passes this")
  p.add_argument("--min-available-gib", type=float, default=3.0,
                 help="kill a stage when the machine has less memory available than this")
  p.add_argument("--stage-timeout", type=float, default=0, help="seconds per stage (0 = none)")
  p.add_argument("--poll-s", type=float, default=0.1, help="memory polling interval")
  p.add_argument("--make-inputs", action="store_true", help=argparse.SUPPRESS)
  p.add_argument("--reload", action="store_true", help=argparse.SUPPRESS)
  p.add_argument("--compiled-memory", action="store_true", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.llm_layers is None:
    args.llm_layers = default_llm_layers(args.small)
  if args.encoder_layers is None:
    args.encoder_layers = MERT_SMALL["num_hidden_layers"] if args.small else MERT_FULL["num_hidden_layers"]
  if not 1 <= args.llm_layers <= 32:
    p.error("--llm-layers must be in 1..32")
  if args.encoder_layers < 1:
    p.error("--encoder-layers must be positive")
  return args


def read_compiled_memory(work: Path) -> list[dict]:
  log = work / "logs" / "compiled_memory.log"
  rows = []
  if log.is_file():
    for line in log.read_text(errors="replace").splitlines():
      if line.startswith("{") and '"train_step_bytes"' in line:
        rows.append(json.loads(line))
  return rows


def extrapolation(args, results: list[Result], cm: list[dict]) -> list[str]:
  """Markdown: each stage's peak RSS carried from --llm-layers to 32 layers (an extrapolation, labelled)."""
  full = LLM_FULL["num_hidden_layers"]
  if args.small or args.llm_layers >= full:
    return []
  at = {r["layers"]: r for r in cm}
  n = args.llm_layers
  h, f = LLM_FULL["hidden_size"], LLM_FULL["intermediate_size"]
  d_params = (full - n) * (4 * h * h + 3 * h * f + 2 * h)
  conv = {"float32": 4, "bfloat16": 2}[args.convert_dtype]
  exp = {"float32": 4, "bfloat16": 2}[args.export_dtype]
  compiled = at.get(n) is not None and at.get(full) is not None
  rule = {  # stage -> (extra bytes at 32 layers or None, basis)
      "inputs": (0, "writes one shard (at most 2 GiB) at a time: no change"),
      "convert_hf": (conv * d_params, f"holds the LLM once in {args.convert_dtype}: + {conv} bytes/parameter"),
      "verify_conversion": (10 * d_params, "ours and transformers' float32 copies of the LLM plus the mapped "
                            "bfloat16 files: + 10 bytes/parameter"),
      "precompute_Finetune": (0, "no LLM: no change"),
      "precompute_Eval": (0, "no LLM: no change"),
      "train": ((at[full]["train_step_bytes"] - at[n]["train_step_bytes"]) if compiled else None,
                "XLA memory analysis of the real jitted step (arguments + temporaries) at 32 vs "
                f"{n} layers"),
      "evaluate": ((at[full]["forward_argument_bytes"] + at[full]["forward_temp_bytes"]
                    - at[n]["forward_argument_bytes"] - at[n]["forward_temp_bytes"]) if compiled else None,
                   f"XLA memory analysis of a bfloat16 LLM forward ({'x'.join(map(str, at[n]['forward_tokens']))}"
                   f" tokens) at 32 vs {n} layers" if compiled else "needs the compiled_memory stage"),
      "export_pytorch": (exp * d_params, f"holds the model once in {args.export_dtype}, writes tensor by "
                         f"tensor: + {exp} bytes/parameter"),
      "reload_transformers": (exp * d_params, f"transformers holds the LLM once in {args.export_dtype}: "
                              f"+ {exp} bytes/parameter"),
  }
  rule["generate"] = rule["evaluate"]
  import psutil
  total = psutil.virtual_memory().total
  lines = [f"### Extrapolation to all 32 LLM layers ({_size(d_params * 2)} more bfloat16 weights)", "",
           f"**An extrapolation, not a measurement**: each stage's measured peak RSS at {n} layers plus what "
           "the extra 28 layers add by the basis given. The train/evaluate/generate rows use XLA's own memory "
           "analysis of the jitted computations, compiled (not run) at the real 32-layer shapes on this CPU "
           "backend (stage compiled_memory).", "",
           f"| stage | measured at {n} layers | extrapolated at 32 layers | fits in this machine's "
           f"{total / GIB:.1f} GiB? | basis |", "|---|---:|---:|---|---|"]
  for r in results:
    if r.stage not in rule or r.status != "ok":
      continue
    extra, basis = rule[r.stage]
    if extra is None:
      lines.append(f"| {r.stage} | {r.peak_rss_gib:.2f} GiB | ? | ? | {basis} |")
      continue
    est = r.peak_rss_gib * GIB + extra
    lines.append(f"| {r.stage} | {r.peak_rss_gib:.2f} GiB | ~{est / GIB:.1f} GiB | "
                 f"{'yes' if est < 0.9 * total else '**no**'} | {basis} |")
  if compiled:
    lines += ["", "XLA memory analysis (CPU backend), GiB:", "",
              "| LLM layers | train step: arguments | train step: temporaries | train step: total "
              "| bf16 forward: arguments | bf16 forward: temporaries |", "|---:|---:|---:|---:|---:|---:|"]
    for k in sorted(at):
      a = at[k]
      lines.append(f"| {k} | {a['train_argument_bytes'] / GIB:.2f} | {a['train_temp_bytes'] / GIB:.2f} | "
                   f"{a['train_step_bytes'] / GIB:.2f} | {a['forward_argument_bytes'] / GIB:.2f} | "
                   f"{a['forward_temp_bytes'] / GIB:.2f} |")
  return lines + [""]


# Everything after this line of an existing report (hand-written findings) is kept when it is rewritten.
NOTES_MARKER = "<!-- Notes below this line are kept when scripts/rehearse.py rewrites the report. -->"


def _write_report(path: Path, args, results, work: Path, started: str, command: str,
                  token_rows: list[dict]) -> None:
  import platform
  import psutil
  params = llm_params(args)
  total_s = sum(r.wall_s for r in results)
  info = {
      "started": started, "total_s": round(total_s, 1), "small": args.small, "llm_layers": args.llm_layers,
      "encoder_layers": args.encoder_layers, "llm_params": params, "convert_dtype": args.convert_dtype,
      "export_dtype": args.export_dtype, "cpus": os.cpu_count(),
      "machine_memory_gib": round(psutil.virtual_memory().total / GIB, 1), "python": platform.python_version(),
      "command": command,
      "stages": [dataclasses.asdict(r) for r in results],
      "records": token_rows,
      "compiled_memory": read_compiled_memory(work),
  }
  path.parent.mkdir(parents=True, exist_ok=True)
  path.with_suffix(".json").write_text(json.dumps(info, indent=2) + "\n")
  lines = [
      "# Rehearsal: the user's command chain" + (" at tiny dimensions (--small)" if args.small else " at full size"),
      "",
      f"Generated by `scripts/rehearse.py` ({started}, {info['cpus']} CPUs, {info['machine_memory_gib']} GiB; "
      f"stages took {total_s / 60:.1f} min in all). Inputs: random weights with the real shapes: "
      + ("tiny dimensions (--small)" if args.small else
         f"MERT-v1-330M ({args.encoder_layers} of 24 layers, float32) and a Vicuna-7B-wide LLaMA with "
         f"{args.llm_layers} of its 32 layers ({params / 1e9:.2f} B parameters, bfloat16, sharded safetensors)")
      + ", the real LLaMA tokenizer, and a dozen synthesized MusicQA-layout clips at 16/44.1/48 kHz.",
      "",
      "Peak RSS: the polled sum over the stage's process tree; ru_maxrss: the kernel's maximum for the stage's "
      "process; machine in use: total minus available memory of the whole (shared) machine during the stage.",
      "",
      f"Command: `{command}`",
      "",
      format_table(results),
      "",
      *([f"Precomputed records, audio tokens per clip by source rate (372,000 native samples, pooled by 325 "
         f"frames): {tokens_by_rate(token_rows)}.", ""] if token_rows else []),
      *extrapolation(args, results, info["compiled_memory"]),
      "Commands, in order:",
      "",
      "```",
      *[r.command.replace(str(work), "$W").replace(sys.executable, "python").replace(str(ROOT) + "/", "")
        for r in results if r.command],
      "```",
      "",
  ]
  kept = path.read_text().split(NOTES_MARKER, 1) if path.is_file() else []
  lines += [NOTES_MARKER + (kept[1] if len(kept) == 2 else "\n")]
  path.write_text("\n".join(lines))
  print(f"report: {path} and {path.with_suffix('.json')}")


def main(argv=None) -> int:
  args = parse_args(argv)
  if args.make_inputs:
    make_inputs(args)
    return 0
  if args.reload:
    return reload_check(args)
  if args.compiled_memory:
    return compiled_memory(args)

  work = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="musilingo-rehearsal-"))
  work = work.resolve()
  args.out = str(work)
  if work.exists() and any(work.iterdir()) and not (work / "logs").is_dir():  # never clobber other files
    sys.exit(f"rehearse: {work} exists and is not an earlier rehearsal's work directory; choose another --out")
  work.mkdir(parents=True, exist_ok=True)
  report = Path(args.report) if args.report else (None if args.small else ROOT / "docs" / "rehearsal.md")
  stages = build_stages(args, work)
  wanted = set(args.stages.split(",")) if args.stages else set(STAGE_NAMES) | set(EXTRA_STAGES)
  unknown = wanted - set(STAGE_NAMES) - set(EXTRA_STAGES)
  if unknown:
    sys.exit(f"rehearse: unknown stages {sorted(unknown)}; choose from {STAGE_NAMES}")
  need = disk_needed(args)
  free = shutil.disk_usage(work).free
  if "inputs" in wanted and free < need:
    sys.exit(f"rehearse: {work} has {_size(free)} free; this rehearsal writes about {_size(need)}")
  started = time.strftime("%Y-%m-%d %H:%M")
  command = " ".join(shlex.quote(a) for a in ["python", "scripts/rehearse.py"] + sys.argv[1:])
  print(f"rehearse: work directory {work}; LLM layers {args.llm_layers}, encoder layers {args.encoder_layers}"
        f"{' (small)' if args.small else ''}", flush=True)
  t0 = time.perf_counter()
  results: dict[str, Result] = {}
  token_rows: list[dict] = []
  saved = work / "logs" / "results.json"
  if args.stages and saved.is_file():  # a partial rerun (--keep, --stages): the other stages' earlier results
    earlier = json.loads(saved.read_text())
    results = {r["stage"]: Result(**r) for r in earlier["stages"] if r["stage"] not in wanted}
    token_rows = earlier.get("records", [])
    started = earlier.get("started", started)
    command = f"{earlier.get('command', '?')}; then {command}"
  try:
    for st in stages:
      if st.name not in wanted:
        continue
      missing = [n for n in st.needs if n in results and results[n].status != "ok"]
      if missing:
        results[st.name] = Result(st.name, note=f"needs {', '.join(missing)}")
        print(f"\n=== {st.name}: skipped (needs {', '.join(missing)})", flush=True)
        continue
      results[st.name] = run_stage(st, work, args)
      if st.name == "precompute_Eval" and results[st.name].status == "ok":
        token_rows = records_summary(work)
        print(f"records: audio tokens per clip by source rate: {tokens_by_rate(token_rows)}", flush=True)
  finally:
    ordered = [results[s.name] for s in stages if s.name in results]
    total = time.perf_counter() - t0
    saved.parent.mkdir(parents=True, exist_ok=True)
    saved.write_text(json.dumps({"started": started, "command": command, "records": token_rows,
                                 "stages": [dataclasses.asdict(r) for r in ordered]}, indent=2) + "\n")
    print("\n" + format_table(ordered))
    if report is not None:
      _write_report(report, args, ordered, work, started, command, token_rows)
    if args.keep:
      print(f"rehearse: kept {work}")
    else:
      shutil.rmtree(work, ignore_errors=True)
  failed = [r.stage for r in ordered if r.status != "ok"]
  print(f"rehearse: {len(ordered) - len(failed)}/{len(ordered)} stages ok in {total:.0f} s"
        + (f"; not ok: {', '.join(failed)}" if failed else ""))
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
