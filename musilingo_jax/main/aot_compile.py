"""Compile the full-size train step for a Cloud TPU topology from this machine (no TPU needed).

  musilingo-aot --config configs/finetune.py:musicqa --topology v5e:4x4 \
      --config.mesh.rules=fsdp --config.mesh.shape='(1,-1,1)' --config.train.batch_size=16 \
      --config.train.accum_steps=2
  musilingo-aot --config configs/lora.py:musicqa --topology v5p:2x2x2 ...
  musilingo-aot --config configs/finetune.py:musicqa --topology 2xv5e:4x4   # two slices
  musilingo-aot --config configs/finetune.py:musicqa --table   # docs/aot_table.md (+ .json)
  musilingo-aot --config configs/finetune.py:musicqa --table --table_cases v5e:4x4/projection/features/fsdp/1 \
      --table_variant model.scan_layers=false --table_variant model.scan_layers=true   # scan before/after

(`python scripts/aot_compile.py ...` is the same program.)

Prints per-chip parameter, optimizer-state, activation and total bytes against the chip's HBM (fits or
not; if not, the biggest buffers), the step's FLOPs (XLA's count and ours) and a roofline step time.
Needs libtpu (`pip install "jax[tpu]"`, or the [tpu] extra); libtpu's "no TPU found" warnings are expected.
"""

# jax and the compiler are imported inside main(): --help stays instant.

import json
import shlex
import sys
import time

from absl import flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file with a :preset.", lock_config=True)
_TOPOLOGY = flags.DEFINE_string("topology", "v5e:4x4", "Cloud TPU topology, e.g. v5e:2x2, v5e:4x4, v5e:8x8, "
                                "v5p:2x2x2; prefix Nx for N slices (multi-slice), e.g. 2xv5e:4x4.")
_JSON = flags.DEFINE_string("json", "", "Also write the report as JSON to this file.")
_TABLE = flags.DEFINE_bool("table", False, "Compile the grid (presets x topologies x batch x trainable x inputs) "
                           "and write a Markdown table (and JSON beside it).")
_TABLE_OUT = flags.DEFINE_string("table_out", "docs/aot_table.md", "Where --table writes.")
_CASES = flags.DEFINE_list("table_cases", [], "Cases for --table instead of aot.DEFAULT_TABLE, each "
                          "topology/trainable/inputs/preset/rows_per_shard, e.g. v5e:4x4/projection/features/fsdp/1.")


_VARIANTS = flags.DEFINE_multi_string(
    "table_variant", [], "Compile every --table case once per variant: config overrides as "
    "field=value[,field=value], e.g. model.scan_layers=false or model.scan_layers=true,model.remat=full "
    "(repeat the flag; in the order given, in one process, so compile times compare).")


_MERGE = flags.DEFINE_list("table_merge", [], "Re-render --table_out from these saved table JSON files (e.g. "
                           "parts compiled on several machines) without compiling.")


def _lora_settings():
  from musilingo_jax.configs import lora
  return lora.get_config("musicqa").train.lora


def _command() -> str:
  """This run's command line, as `python scripts/aot_compile.py ...` (for the table's preamble)."""
  return " ".join(["python scripts/aot_compile.py", *(shlex.quote(a) for a in sys.argv[1:])])


def _parse_value(text: str):
  low = text.strip().lower()
  if low in ("true", "false"):
    return low == "true"
  try:
    return int(text)
  except ValueError:
    pass
  try:
    return float(text)
  except ValueError:
    return text.strip()


def parse_variant(spec: str) -> dict:
  """"model.scan_layers=true,model.remat=full" -> {"model.scan_layers": True, "model.remat": "full"}."""
  out = {}
  for part in filter(None, (p.strip() for p in spec.split(","))):
    if "=" not in part:
      raise ValueError(f"--table_variant {spec!r}: expected field=value[,field=value]")
    key, value = part.split("=", 1)
    out[key.strip()] = _parse_value(value)
  return out


def main(argv):
  del argv
  from musilingo_jax import aot
  from musilingo_jax import config as cfglib
  c = _CONFIG.value
  if not _TABLE.value:
    topo, slices = aot.parse_topology(_TOPOLOGY.value)
    try:
      r = aot.compile_step(c, topo, num_slices=slices)
    except cfglib.ConfigError as e:
      print(f"error: {e}\n(on a pod, keep the reference's rows per update with e.g. "
            f"--config.train.batch_size=<chips> --config.train.accum_steps=<32 / chips>)", file=sys.stderr)
      sys.exit(2)
    except aot.LibtpuMissing as e:
      print(f"error: {e}", file=sys.stderr)
      sys.exit(2)
    print(aot.format_report(r), flush=True)
    if _JSON.value:
      with open(_JSON.value, "w") as f:
        json.dump(r.to_json(), f, indent=1)
    return

  if _MERGE.value:
    results = aot.load_results(_MERGE.value)
    took = sum(r.compile_s or 0 for r in results)
    print(aot.write_table(results, _TABLE_OUT.value, aot.table_header(c, took, len(results))))
    return

  lora = _lora_settings()
  variants = [parse_variant(v) for v in _VARIANTS.value] or [{}]

  def base_for(variant):
    def base(mode):
      cc = c.copy_and_resolve_references()
      with cc.unlocked():
        cc.train.trainable = mode
        if mode == "projection+lora" and c.train.trainable != "projection+lora":
          cc.train.lora = lora
      cc.update_from_flattened_dict(variant)
      return cc
    return base

  cases = aot.DEFAULT_TABLE
  if _CASES.value:
    cases = [tuple(x.split("/")) for x in _CASES.value]
    cases = [(t, m, i, p, int(r)) for t, m, i, p, r in cases]
  t0 = time.perf_counter()

  def write(results):
    aot.write_table(results, _TABLE_OUT.value, aot.table_header(c, time.perf_counter() - t0, len(results),
                                                                _command()))

  results = []
  for variant in variants:
    if variant:
      print(f"variant {variant}", flush=True)
    done = list(results)
    results = done + aot.run_table(base_for(variant), cases, log=lambda s: print(s, flush=True),
                                   on_result=lambda rs, done=done: write(done + rs))
  write(results)
  print(open(_TABLE_OUT.value).read())


def run() -> None:
  """Console-script entry point (musilingo-aot)."""
  from musilingo_jax.main import cli
  cli.absl_run(__name__, __doc__, main)


if __name__ == "__main__":
  run()
