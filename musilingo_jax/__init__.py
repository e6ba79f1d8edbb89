"""musilingo-jax: a JAX / Flax NNX training stack for MusiLingo-style music language models."""

from musilingo_jax import storage as _storage

# Point every storage client (gcsfs, tensorstore, google-cloud-storage) at STORAGE_EMULATOR_HOST when it is set
# (musilingo_jax/storage.py), in every process that imports the package, before any client is made.
_storage.configure_from_env()
