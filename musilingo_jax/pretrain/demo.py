"""Where pretraining's inputs come from, and the demo's pretrained encoder.

Clips (`config.pretrain.source`): "demo" renders unlabeled excerpts of the QA demo set's training pieces
(data/demo.py `build_unlabeled_set`, cached under $MUSILINGO_CACHE/demo; the set's test pieces are never
rendered), a folder holds .wav clips, "records:<dir>" reads the audio of scripts/precompute.py records (split
`config.pretrain.source_split`). `ensure_targets` prepares their targets (pretrain/targets.py) into
`config.pretrain.targets_dir`, or, when that is empty, into $MUSILINGO_CACHE/mert_pretrain/targets-<key>, the
key hashing everything the targets depend on (so runs that change only the training reuse them).

The demo's encoder (`config.model.encoder_init = "pretrain_demo"`, build.build_model): configs/mert_pretrain.py:demo
with the finetune config's seed and encoder preset, run by `python -m musilingo_jax.main.pretrain_encoder` in a
subprocess (a separate process: the trainer that drives it also drives the run that asked, and build.py cannot
import it) in the workdir $MUSILINGO_CACHE/mert_pretrain/demo-<key of that config>. It is resumable there (the
trainer's checkpoints), and finished when WORKDIR/encoder/meta.json exists (written last, the folder renamed
into place), so a run that finds it never pretrains again.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

from musilingo_jax import assets, storage
from musilingo_jax import config as cfglib
from musilingo_jax.data import demo as demo_data
from musilingo_jax.pretrain import targets as targets_lib

ENCODER_DIR, ENCODER_HF_DIR, PROBE_FILE = "encoder", "encoder_hf", "probe.json"


def target_config(c) -> targets_lib.TargetConfig:
  p = c.pretrain
  return targets_lib.TargetConfig(
      features=tuple(p.features), codebook_size=int(p.codebook_size), kmeans_frames=int(p.kmeans_frames),
      kmeans_iters=int(p.kmeans_iters), kmeans_clips=int(p.kmeans_clips), n_mels=int(p.n_mels),
      cqt_bins=int(p.cqt_bins), cqt_bins_per_octave=int(p.cqt_bins_per_octave),
      valid_fraction=float(p.valid_fraction), seed=int(c.seed))


# ---------------------------------------------------------------------------------------- the QA demo set

def qa_set_config(name: str):
  """The finetune config of the QA demo set `name` ("demo" | "smoke"): its data.demo_* fields say the set."""
  return cfglib.demo_config(cfglib.base_config(), smoke=(name == "smoke"))


def qa_set_dir(name: str) -> Path:
  """The QA demo set of configs/finetune.py:<name>, built (or reused) in the cache, as build.prepare_demo
  builds it when config.data.demo_dir is empty."""
  qc = qa_set_config(name)
  pieces = tuple(qc.data.demo_pieces)
  out = assets.cache_dir() / "demo" / demo_data.set_dir_name(pieces, qc.data.demo_clips_per_piece,
                                                             qc.data.demo_clip_seconds)
  demo_data.build_demo_dataset(out, num_train_pieces=pieces[0], num_test_pieces=pieces[1],
                               clips_per_piece=qc.data.demo_clips_per_piece,
                               clip_seconds=qc.data.demo_clip_seconds, seed=0, workers=2)
  return out


# ---------------------------------------------------------------------------------------- clips and targets

def clip_source(c):
  """(clips [(id, handle)], load_audio(handle) -> float32 [n] at 24 kHz, a description that keys the targets)."""
  source = c.pretrain.source
  if source == "demo":
    qa = qa_set_dir(c.pretrain.demo_set)
    test_pieces = json.loads((qa / "meta.json").read_text())["pieces"]["test"]
    n_test = len(test_pieces)
    p = c.pretrain
    out = assets.cache_dir() / "demo" / (f"unlabeled-{p.demo_pieces}x{n_test}-{p.demo_clips_per_piece}-"
                                          f"{float(p.demo_clip_seconds):g}s")
    meta = demo_data.build_unlabeled_set(out, num_pieces=int(p.demo_pieces), num_test_pieces=n_test,
                                         clips_per_piece=int(p.demo_clips_per_piece),
                                         clip_seconds=float(p.demo_clip_seconds), seed=0, workers=2,
                                         exclude_pieces=test_pieces)
    return (targets_lib.wav_clips(out / "audio"), targets_lib.load_wav,
            f"demo unlabeled {json.dumps(meta['params'], sort_keys=True)}")
  if source.startswith("records:"):
    directory, split = source[len("records:"):], c.pretrain.source_split
    return targets_lib.record_clips(directory, split), targets_lib.load_record_audio, f"records {directory} {split}"
  if not os.path.isdir(source):
    raise ValueError(f"config.pretrain.source = {source!r}: no such folder")
  folder = os.path.abspath(source)
  return targets_lib.wav_clips(folder), targets_lib.load_wav, f"wav folder {folder}"


def targets_key(c, encoder_cfg, source: str) -> str:
  geometry = [list(encoder_cfg.conv_kernel), list(encoder_cfg.conv_stride)]
  blob = json.dumps([target_config(c).params(), source, geometry], sort_keys=True)
  return hashlib.sha1(blob.encode()).hexdigest()[:12]


def ensure_targets(c, encoder_cfg, *, progress: bool = True) -> str:
  """The prepared targets directory of config `c` (prepared first when missing; module docstring)."""
  clips, load, source = clip_source(c)
  out = c.pretrain.targets_dir or os.fspath(assets.cache_dir() / "mert_pretrain"
                                            / f"targets-{targets_key(c, encoder_cfg, source)}")
  targets_lib.prepare_targets(clips, out, target_config(c), encoder_cfg, source=source, load_audio=load,
                              progress=progress)
  return out


# ---------------------------------------------------------------------------------------- the demo's encoder

def demo_pretrain_config(c):
  """configs/mert_pretrain.py:demo for the finetune config `c`: its seed and encoder preset (so step 0 of
  pretraining is exactly the random encoder the demo would use)."""
  from musilingo_jax.configs import mert_pretrain
  pc = mert_pretrain.get_config("demo")
  pc.seed = int(c.seed)
  pc.model.encoder_preset = c.model.encoder_preset
  return pc


def demo_workdir(c) -> Path:
  pc = demo_pretrain_config(c)
  key = hashlib.sha1(pc.to_json(sort_keys=True).encode()).hexdigest()[:12]
  return assets.cache_dir() / "mert_pretrain" / f"demo-{key}"


def demo_encoder_dir(c, *, pretrain: bool = True) -> Path:
  """The demo's pretrained encoder (a converted-encoder directory), pretraining it first when missing."""
  workdir = demo_workdir(c)
  enc = workdir / ENCODER_DIR
  if (enc / "meta.json").is_file():
    return enc
  if not pretrain:
    raise FileNotFoundError(f"{enc}: the demo's pretrained encoder is missing")
  pc = demo_pretrain_config(c)
  config_file = Path(__file__).resolve().parents[1] / "configs" / "mert_pretrain.py"
  cmd = [sys.executable, "-m", "musilingo_jax.main.pretrain_encoder", "--config", f"{config_file}:demo",
         f"--config.seed={pc.seed}", f"--config.model.encoder_preset={pc.model.encoder_preset}",
         "--workdir", os.fspath(workdir)]
  print(f"demo: pretraining the encoder (MERT-style, configs/mert_pretrain.py:demo) in {workdir}", flush=True)
  proc = subprocess.run(cmd, check=False)
  if proc.returncode != 0 or not (enc / "meta.json").is_file():
    raise RuntimeError(f"pretraining the demo encoder failed (exit {proc.returncode}): {' '.join(cmd)}")
  return enc


def read_probe(encoder_dir) -> dict | None:
  """The probe record (probe.json) beside a pretrained encoder directory, or None."""
  path = storage.path(encoder_dir).parent / PROBE_FILE
  return json.loads(path.read_text()) if path.is_file() else None
