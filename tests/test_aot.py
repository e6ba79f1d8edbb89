"""AOT compilation of the real train step for a Cloud TPU topology (libtpu, no TPU): a tiny model on v5e:2x2."""

import importlib.util
import os

import jax
import pytest

pytest.importorskip("libtpu", reason='libtpu is not installed (pip install "jax[tpu]==' + jax.__version__
                    + '"): AOT compilation for TPU topologies needs it')

from musilingo_jax.models.mert import MERTConfig  # noqa: E402
from musilingo_jax import aot  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(preset: str, *, rules: str, shape, trainable="projection", use_features=True):
  spec = importlib.util.spec_from_file_location("_finetune_cfg", os.path.join(ROOT, "configs", "finetune.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config(preset)
  c.model.encoder_preset, c.model.llm_preset = "tiny", "tiny"
  c.mesh.rules, c.mesh.shape = rules, shape
  c.train.trainable = trainable
  c.train.batch_size, c.train.accum_steps = 4, 2
  c.data.max_len = 64
  c.data.use_features = use_features
  return c


@pytest.fixture(scope="module")
def devices():
  return aot.topology_devices("v5e:2x2")


def test_topology_and_cpu_backend(devices):
  assert len(devices) == 4 and devices[0].platform == "tpu"
  assert aot.chip_of(devices).name == "v5e"
  assert aot.parse_topology("2xv5e:4x4") == ("v5e:4x4", 2)
  assert aot.parse_topology("v5p:2x2x2") == ("v5p:2x2x2", 1)
  # libtpu installed must not move ordinary work off the CPU.
  assert jax.default_backend() == "cpu"


def test_fsdp_shards_parameters_four_ways(devices):
  c = _config("musicqa", rules="fsdp", shape=(1, -1, 1))
  r = aot.compile_step(c, "v5e:2x2", devices=devices)
  assert r.chips == 4 and r.mesh == {"data": 1, "fsdp": 4, "tensor": 1}
  assert r.fits is True and r.hbm_bytes == aot.CHIPS["TPU v5 lite"].hbm_bytes
  # Frozen weights split along `embed` over 4 chips: about a quarter each (small conv/norm leaves replicated).
  assert 0 < r.encoder_bytes < r.frozen_bytes
  ratio = r.frozen_bytes / r.frozen_bytes_global
  assert 0.25 <= ratio <= 0.35, ratio
  # The compiler's argument bytes agree with ours (TPU tile padding aside).
  ours = r.trainable_bytes + r.frozen_bytes + r.opt_state_bytes + r.batch_bytes
  assert ours <= r.argument_bytes <= 2 * ours, (ours, r.argument_bytes)
  # AdamW: two f32 moments per trainable leaf (mu, nu) plus counts.
  assert 2 * r.trainable_bytes <= r.opt_state_bytes <= 2 * r.trainable_bytes + 1024
  assert r.total_bytes >= r.argument_bytes and r.xla_flops > 0 and r.analytic_flops > 0
  assert r.step_time_s > 0 and r.tokens_per_s_per_chip > 0
  text = aot.format_report(r)
  assert "FITS" in text and "frozen params" in text and "roofline (v5e" in text


def test_dp_replicates_lora(devices):
  c = _config("musicqa", rules="dp", shape=(-1, 1, 1), trainable="projection+lora")
  r = aot.compile_step(c, "v5e:2x2", devices=devices)
  assert r.mesh == {"data": 4, "fsdp": 1, "tensor": 1} and r.trainable_mode == "projection+lora"
  assert r.frozen_bytes == r.frozen_bytes_global  # replicated
  assert r.trainable_bytes == r.trainable_bytes_global > 32 * 64 * 4  # projection + LoRA leaves, replicated
  assert r.fits is True


def test_batch_shapes_audio_window():
  c = _config("musicqa", rules="dp", shape=(-1, 1, 1), use_features=False)
  enc = MERTConfig.mert_v1_330m()
  shapes = aot.batch_shapes(c, enc)
  # The longest MusicQA clip: 372,000 samples of a 16 kHz file = 23.25 s at 24 kHz; rows = batch * accum.
  assert shapes["audio"][0] == (8, 558_000) and shapes["audio_pad_len"][0] == (8,)
  assert shapes["input_ids"][0] == (8, 64) and shapes["valid"][0] == (8,) and "features" not in shapes
  assert shapes["audio_tokens"][0] == (8,)
  c.data.use_features = True
  assert aot.batch_shapes(c, enc)["features"][0] == (8, 6, 1024)  # 1743 frames -> ceil(1743 / 325) = 6
  c.data.n_audio_tokens = 8  # an explicit, wider bound
  assert aot.batch_shapes(c, enc)["features"][0] == (8, 8, 1024)


def test_oom_message_is_parsed():
  # What libtpu 0.0.42 says when a step does not fit (seen compiling Vicuna-7B dp on v5e:2x2 at 4 rows/chip).
  msg = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries "
         "(16.02G) exceeds available HBM (15.75G).")
  r = aot.AotResult(topology="v5e:2x2", num_slices=1, chips=4, chip="v5e", mesh={}, rules="dp",
                    trainable_mode="projection", inputs="features", batch_size=4, accum_steps=1,
                    rows_per_shard=1, seq_len=256, hbm_bytes=None)
  aot._memory_from_oom(r, msg)
  assert r.hbm_bytes == int(15.75 * 2 ** 30) == aot.CHIPS["TPU v5 lite"].hbm_bytes
  aot._memory_from_oom(r, "Used 20.55G of 95.74G hbm. Exceeded hbm capacity by 4.80G.")
  assert r.hbm_bytes == aot.CHIPS["TPU v5"].hbm_bytes
  assert aot._oom_summary("XlaRuntimeError: x\n" + msg).startswith("RESOURCE_EXHAUSTED: Ran out of memory")
