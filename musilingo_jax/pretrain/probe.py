"""Linear probes: how much of instrument, key and tempo class an encoder's pooled features carry.

A clip's feature is what MusiLingo's projection sees, averaged over the clip: the mean over every hidden
state (models/musilingo.py `pooled_features`), then the mean over time, of the clip's first `seconds`. A
ridge-regression classifier (one-hot targets, closed form; features standardised with the training clips'
statistics, the ridge strength picked by 5-fold cross-validation on the training clips) is fitted on the
demo set's training clips and scored on its test clips (other pieces). `majority` is the accuracy of always
answering the most common training label. numpy and JAX only (no scikit-learn).
"""

from __future__ import annotations

import collections
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

TASKS = ("instrument", "key", "tempo_class")
LAMBDAS = (0.1, 1.0, 10.0, 100.0, 1000.0)


def ridge_fit(x: np.ndarray, y: np.ndarray, n_classes: int, lam: float) -> np.ndarray:
  """Weights [d + 1, n_classes] of ridge regression onto one-hot labels (the bias column unpenalised)."""
  xb = np.concatenate([x, np.ones((len(x), 1))], 1).astype(np.float64)
  reg = lam * np.eye(xb.shape[1])
  reg[-1, -1] = 0.0
  onehot = np.eye(n_classes)[y]
  return np.linalg.solve(xb.T @ xb + reg, xb.T @ onehot)


def ridge_predict(w: np.ndarray, x: np.ndarray) -> np.ndarray:
  return (np.concatenate([x, np.ones((len(x), 1))], 1) @ w).argmax(1)


def probe_accuracy(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray,
                   n_classes: int, *, lambdas=LAMBDAS, folds: int = 5, seed: int = 0) -> tuple[float, float]:
  """(test accuracy, the chosen ridge strength) of the standardised ridge classifier (module docstring)."""
  mu, sd = x_train.mean(0), x_train.std(0) + 1e-6
  xtr, xte = (x_train - mu) / sd, (x_test - mu) / sd
  order = np.random.default_rng(seed).permutation(len(xtr))
  parts = np.array_split(order, min(folds, len(xtr)))
  best = (-1.0, lambdas[0])
  for lam in lambdas:
    hits = 0
    for k in range(len(parts)):
      val = parts[k]
      fit = np.concatenate([parts[j] for j in range(len(parts)) if j != k])
      hits += int((ridge_predict(ridge_fit(xtr[fit], y_train[fit], n_classes, lam), xtr[val]) == y_train[val]).sum())
    if hits / len(xtr) > best[0]:
      best = (hits / len(xtr), lam)
  w = ridge_fit(xtr, y_train, n_classes, best[1])
  return float((ridge_predict(w, xte) == y_test).mean()), best[1]


_RUNNERS: dict = {}


def clip_features(encoder, audio: np.ndarray, *, batch_size: int = 16) -> np.ndarray:
  """[N, S] float32 clips -> [N, D] float32: mean over hidden states, then over time (eval mode)."""
  graphdef, state = nnx.split(encoder)
  run = _RUNNERS.get(graphdef)
  if run is None:
    @jax.jit
    def run(state, x):
      states = nnx.merge(graphdef, state)(x, deterministic=True)
      return (sum(s.astype(jnp.float32) for s in states) / len(states)).mean(1)
    _RUNNERS.clear()
    _RUNNERS[graphdef] = run
  out = []
  for lo in range(0, len(audio), batch_size):
    chunk = audio[lo:lo + batch_size]
    n = len(chunk)
    if n < batch_size:  # one compiled shape
      chunk = np.concatenate([chunk, np.zeros((batch_size - n,) + chunk.shape[1:], chunk.dtype)])
    out.append(np.asarray(run(state, jnp.asarray(chunk)))[:n])
  return np.concatenate(out)


class ProbeSet:
  """The labelled clips of a demo set directory (data/demo.py: DIR/{train,test}.json + audio/), each cut
  to its first `seconds`; audio is read on first use and kept."""

  def __init__(self, data_dir, *, seconds: float = 4.0, tasks: tuple[str, ...] = TASKS, sample_rate: int = 24_000):
    self.dir, self.tasks = Path(data_dir), tuple(tasks)
    self.samples = int(round(seconds * sample_rate))
    self.clips: dict[str, list[dict]] = {}
    for split in ("train", "test"):
      seen = {}
      for e in json.loads((self.dir / f"{split}.json").read_text()):
        seen.setdefault(e["clip_id"], {"audio": e["audio"], "labels": e["labels"]})
      self.clips[split] = list(seen.values())
    self._audio: dict[str, np.ndarray] = {}
    classes = collections.defaultdict(set)
    for split in self.clips:
      for clip in self.clips[split]:
        for t in self.tasks:
          classes[t].add(str(clip["labels"][t]))
    self.classes = {t: sorted(v) for t, v in classes.items()}

  def audio(self, split: str) -> np.ndarray:
    if split not in self._audio:
      import soundfile as sf
      rows = []
      for clip in self.clips[split]:
        x, _ = sf.read(self.dir / clip["audio"], dtype="float32", frames=self.samples)
        x = x if x.ndim == 1 else x.mean(1)
        rows.append(np.pad(x, (0, self.samples - len(x))))
      self._audio[split] = np.stack(rows).astype(np.float32)
    return self._audio[split]

  def labels(self, split: str, task: str) -> np.ndarray:
    index = {c: i for i, c in enumerate(self.classes[task])}
    return np.asarray([index[str(c["labels"][task])] for c in self.clips[split]], np.int64)

  def majority(self) -> dict[str, float]:
    out = {}
    for t in self.tasks:
      ytr, yte = self.labels("train", t), self.labels("test", t)
      out[t] = float((yte == np.bincount(ytr, minlength=len(self.classes[t])).argmax()).mean())
    return out

  def evaluate(self, encoder, *, batch_size: int = 16) -> dict[str, float]:
    """{task: test accuracy} of the linear probe on `encoder`'s pooled features, and "mean" over tasks."""
    x_train = clip_features(encoder, self.audio("train"), batch_size=batch_size)
    x_test = clip_features(encoder, self.audio("test"), batch_size=batch_size)
    out = {}
    for t in self.tasks:
      out[t], _ = probe_accuracy(x_train, self.labels("train", t), x_test, self.labels("test", t),
                                 len(self.classes[t]))
    out["mean"] = float(np.mean([out[t] for t in self.tasks]))
    return out
