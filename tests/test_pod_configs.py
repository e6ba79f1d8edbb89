"""The README's Cloud TPU pod recipe, checked as written: its code blocks are parsed here (the exact
`--config...` flags of each `train.py` command, through the same ml_collections flag parser the program
uses), and each config is validated against its slice's chip and host counts. Edit the README and this test
follows; nothing is copied."""

import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# What each accelerator type is (Cloud TPU docs): v5e types count chips, v5p types count TensorCores (2 per
# chip). Both have 4 chips per host.
SLICES = {"v5litepod-32": {"chips": 32, "hosts": 8}, "v5p-64": {"chips": 32, "hosts": 8}}


def _pod_section() -> str:
  text = (ROOT / "README.md").read_text()
  start = text.index("### Cloud TPU pods")
  end = text.find("\n### ", start + 1)
  return text[start:end if end != -1 else len(text)]


def _commands(section: str) -> list[str]:
  """The shell commands of the section's ```bash blocks, continuation lines joined."""
  out = []
  for block in re.findall(r"```bash\n(.*?)```", section, re.S):
    out += [line.strip() for line in block.replace("\\\n", " ").splitlines() if line.strip()]
  return out


def _gcloud(cmd: str) -> tuple[str, str, dict[str, str]]:
  """`gcloud compute tpus tpu-vm <verb> NAME --k=v ...` -> (verb, NAME, {k: v})."""
  words = shlex.split(cmd)
  assert words[:4] == ["gcloud", "compute", "tpus", "tpu-vm"], cmd
  opts = dict(w[2:].split("=", 1) if "=" in w else (w[2:], "") for w in words[5:] if w.startswith("--"))
  return words[4], words[5], opts


def _recipe():
  """{tpu name: {"type": accelerator type, "install": ssh command or None, "train": [train.py argv]}}."""
  slices: dict[str, dict] = {}
  for cmd in _commands(_pod_section()):
    if not cmd.startswith("gcloud compute tpus tpu-vm"):
      continue
    verb, name, opts = _gcloud(cmd)
    if verb == "scp":  # scp LOCAL NAME:[DEST]
      name = next(w for w in shlex.split(cmd)[6:] if not w.startswith("--")).split(":", 1)[0]
      assert opts.get("worker") == "all", f"{name}: every worker needs the copy: {cmd}"
      continue
    s = slices.setdefault(name, {"type": None, "install": None, "train": None})
    if verb == "create":
      s["type"] = opts["accelerator-type"]
    elif verb == "ssh":
      assert opts.get("worker") == "all", f"{name}: every worker must run it: {cmd}"
      inner = opts["command"]
      if "scripts/train.py" in inner:
        argv = shlex.split(inner.split("scripts/train.py", 1)[1])
        s["train"] = argv
      elif "pip install" in inner:
        s["install"] = inner
  return slices


def _parse_config(argv: list[str]):
  """The config the command line builds, through the program's own flag parser (ml_collections)."""
  from absl import flags
  from ml_collections import config_flags
  args = []
  for a in argv:
    if a.startswith("--config="):
      a = "--config=" + str(ROOT / a.split("=", 1)[1])
    elif a == "--config":
      continue
    elif args == [] and a.startswith("configs/"):  # "--config configs/x.py:preset"
      a = "--config=" + str(ROOT / a)
    if a.startswith("--config"):
      args.append(a)
  fv = flags.FlagValues()
  # The overrides (--config.a.b=...) are found in sys_argv when the flag is defined, as in the program.
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True,
                                  sys_argv=["train.py", *args])
  fv(["train.py", *args])
  return fv.config


def _flag(argv, name):
  for i, a in enumerate(argv):
    if a.startswith(f"--{name}="):
      return a.split("=", 1)[1]
    if a == f"--{name}":
      return argv[i + 1]
  return None


def test_readme_has_both_slices_with_an_install_and_a_train_command():
  recipe = _recipe()
  types = {s["type"] for s in recipe.values()}
  assert types == set(SLICES), recipe
  assert all(s["train"] for s in recipe.values()), recipe
  installs = [s["install"] for s in recipe.values() if s["install"]]
  assert installs and all("requirements.txt" in i and "jax[tpu]" in i for i in installs)


@pytest.mark.parametrize("accelerator", sorted(SLICES))
def test_readme_pod_config_validates_on_its_slice(accelerator):
  from musilingo_jax import config as cfglib
  name, s = next((n, s) for n, s in _recipe().items() if s["type"] == accelerator)
  argv = s["train"]
  c = _parse_config(argv)
  slice_ = SLICES[accelerator]
  cfglib.validate(c, num_devices=slice_["chips"], num_processes=slice_["hosts"])
  # Everything the run touches is in the bucket: nothing is shared between hosts but it.
  assert _flag(argv, "workdir").startswith("gs://"), name
  assert c.model.checkpoint.startswith("gs://") and c.data.records_dir.startswith("gs://"), name
  # One row per chip, split evenly over the hosts (what the README says batch_size means on a pod).
  assert c.train.batch_size == slice_["chips"], (name, c.train.batch_size)
  assert c.train.batch_size % slice_["hosts"] == 0
  # The same flags refuse a slice they do not fit (the check is real).
  with pytest.raises(cfglib.ConfigError):
    cfglib.validate(c, num_devices=slice_["chips"] * 3 // 2, num_processes=slice_["hosts"])
