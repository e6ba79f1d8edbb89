"""What the benchmarks share: logging, the matmul calibration, RSS measurement, JSON writing, common CLI flags.

Imports only the standard library at module level (jax, torch and psutil inside the functions that need them),
so that `python -m benchmarks.convert --child ...`, whose peak RSS is the measurement, loads nothing else.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the repository (benchmarks/ and musilingo_jax/ sit here)
HERE = Path(__file__).resolve().parent  # benchmarks/: BENCHMARKS.md, .json, .png are written here

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def log(msg: str) -> None:
  print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---- CLI -----------------------------------------------------------------------------------------------

def add_common_args(p: argparse.ArgumentParser, *, json_help: str = "also write the results to this file") -> None:
  """The flags every benchmark takes: --quick (fewer layers / steps / tokens: checks the machinery, not the
  goals) and --json."""
  p.add_argument("--quick", action="store_true",
                 help="a small, fast run (checks the machinery, not the goals)")
  p.add_argument("--json", default=None, help=json_help)


def parse(p: argparse.ArgumentParser, argv=None, quick_defaults: dict | None = None) -> argparse.Namespace:
  """Parses argv; with --quick, `quick_defaults` replace the defaults (flags given explicitly still win)."""
  args = p.parse_args(argv)
  if args.quick and quick_defaults:
    p.set_defaults(**quick_defaults)
    args = p.parse_args(argv)
  return args


def module_command(module: str, *args: str) -> list[str]:
  """argv that runs `python -m <module> args...` with this interpreter (run it with cwd=ROOT or child_env())."""
  return [sys.executable, "-m", module, *args]


def child_env(**overrides) -> dict:
  """The environment for a benchmark's child process: this one's, with the repository importable."""
  env = {**os.environ, **overrides}
  env["PYTHONPATH"] = os.pathsep.join(x for x in (str(ROOT), os.environ.get("PYTHONPATH", "")) if x)
  return env


# ---- matmul calibration (the MFU denominator) ----------------------------------------------------------

def calibrate(tries: int = 3) -> float:
  """The f32 matmul FLOP/s (trainer.calibrate_matmul_flops), best of a few tries: one try is ~50 ms and a
  momentary slow-down of the shared CPU would understate the peak (and overstate MFU)."""
  from musilingo_jax import trainer
  return max(trainer.calibrate_matmul_flops(n=1024, repeats=5) for _ in range(tries))


def torch_calibrate(n: int = 1024, repeats: int = 5) -> float:
  """torch's f32 n x n matmul FLOP/s, measured like trainer.calibrate_matmul_flops."""
  import torch
  x = torch.ones(n, n)
  x @ x
  t = time.perf_counter()
  for _ in range(repeats):
    x @ x
  return 2 * n ** 3 * repeats / (time.perf_counter() - t)


# ---- memory --------------------------------------------------------------------------------------------

def rss_mb() -> float:
  import psutil
  return psutil.Process().memory_info().rss / 2 ** 20


def own_peak_rss() -> int:
  """This process's own peak RSS in bytes (VmHWM; ru_maxrss would also carry a forking parent's RSS across
  exec)."""
  with open("/proc/self/status") as f:
    return [int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:")][0]


def _rss_kb(pid: int) -> int:
  try:
    with open(f"/proc/{pid}/status") as f:
      for line in f:
        if line.startswith("VmRSS:"):
          return int(line.split()[1])
  except OSError:
    pass
  return 0


def measure_process(cmd: list[str], env: dict, cwd: Path | str | None = None) -> dict:
  """Runs cmd in a fresh process; its peak RSS from /proc polling (VmRSS every 10 ms) and from getrusage
  (children), and its wall time (start-up and imports included)."""
  before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
  t0 = time.perf_counter()
  proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  polled = 0
  while proc.poll() is None:
    polled = max(polled, _rss_kb(proc.pid))
    time.sleep(0.01)
  wall = time.perf_counter() - t0
  out = proc.stdout.read()
  if proc.returncode:
    raise RuntimeError(f"{cmd} failed ({proc.returncode}):\n{out[-3000:]}")
  maxrss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
  # ru_maxrss of children is the max over all children so far: only trust it when it grew.
  peak_kb = max(polled, maxrss if maxrss > before else 0)
  return {"peak_rss_bytes": peak_kb * 1024, "polled_rss_bytes": polled * 1024, "wall_s": round(wall, 2)}


# ---- results -------------------------------------------------------------------------------------------

def save_json(results: dict, path: str | Path | None = None) -> None:
  """Writes `results` to `path`, or to results["_json"] (the runner's progress file) when no path is given.
  Keys starting with "_" are not written."""
  path = path or results.get("_json")
  if path:
    Path(path).write_text(json.dumps({k: v for k, v in results.items() if not k.startswith("_")}, indent=1,
                                     default=float))


def finish(results: dict, markdown: str | None, write_markdown) -> int:
  """A benchmark's end: the results JSON (save_json), then its markdown table when asked for; exit status 0."""
  save_json(results)
  if markdown:
    write_markdown(results, markdown)
  return 0


def run_line(command: str, env: dict) -> str:
  """The sentence every markdown report opens with: the command, the machine and the load it started on."""
  return (f"`{command}` on {env['cpu_count']} CPU cores, jax {env['jax']}, torch {env['torch']}; load average at "
          f"start {env['load_start']}.")


def environment() -> dict:
  """The versions and machine every report names."""
  import platform

  import jax
  import torch
  import transformers
  return {"cpu_count": os.cpu_count(), "platform": platform.platform(), "jax": jax.__version__,
          "torch": torch.__version__, "transformers": transformers.__version__,
          "torch_threads": torch.get_num_threads(), "devices": str(jax.devices()),
          "load_start": load_average()}


def load_average() -> str:
  return " ".join(f"{x:.1f}" for x in os.getloadavg())
