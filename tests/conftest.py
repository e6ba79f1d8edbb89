"""Test setup: 8 host CPU devices (set before jax is imported), no network, float32 matmuls."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# libtpu (installed by .ci/run for the TPU AOT test) must not make JAX probe for a TPU in every process.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

# gcs_bucket / gcs_prefix: a loopback GCS emulator for the gs:// tests (tests/gcs.py).
pytest_plugins = ["gcs"]
