"""A --config that cannot be built is one line on stderr and exit status 2, before anything is built: a
missing config file, an unknown preset, an override of a key the config lacks (with the closest known keys).
And the config a run stores names its local paths absolutely (config.absolute_paths, applied by trainer.run)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TRAIN = [sys.executable, str(ROOT / "scripts" / "train.py")]
FINETUNE = str(ROOT / "configs" / "finetune.py")


@pytest.mark.parametrize("args,expect", [
    ([f"--config={FINETUNE}:smoke", "--config.nonexistent=1"],
     "error: --config.nonexistent: " + FINETUNE + ":smoke has no key 'nonexistent'"),
    ([f"--config={FINETUNE}:smoke", "--config.train.num_step=3"],
     "closest known: config.train.num_steps"),
    ([f"--config={ROOT / 'configs' / 'nope.py'}:smoke"], "no such config file"),
    ([f"--config={FINETUNE}:nopreset"], "unknown preset 'nopreset'"),
])
def test_bad_config_is_one_line_and_exit_2(tmp_path, args, expect):
  workdir = tmp_path / "run"
  proc = subprocess.run(TRAIN + args + ["--workdir", str(workdir)], capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2, proc.stderr[-2000:]
  errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1 and expect in errors[0], proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr
  assert not workdir.exists()  # nothing was created


def test_run_config_paths_become_absolute(tmp_path, monkeypatch):
  from musilingo_jax import config as cfglib
  from musilingo_jax.configs import finetune
  monkeypatch.chdir(tmp_path)
  c = finetune.get_config("smoke")
  c.data.records_dir, c.model.checkpoint, c.compilation_cache = "records/musicqa", "gs://bucket/converted", ""
  a = cfglib.absolute_paths(c)
  assert a.data.records_dir == str(tmp_path / "records" / "musicqa")
  assert a.model.checkpoint == "gs://bucket/converted"       # URLs as given
  assert a.model.llm_gguf == "smollm2" and a.compilation_cache == ""  # a name, and "", as given
  assert c.data.records_dir == "records/musicqa"              # the caller's config is not changed
  c.model.llm_gguf = "models/x.gguf"
  assert cfglib.absolute_paths(c).model.llm_gguf == str(tmp_path / "models" / "x.gguf")
