"""Released checkpoints and Hub ids: `--projection` reads a Hugging Face-layout MusiLingo release (sharded
safetensors whose keys hold `<prefix>llama_proj.*`, only the shard holding them opened), and a path argument
may be a Hub id resolved through huggingface_hub's cache (musilingo_jax/hub.py).

The cache here is laid out exactly as the hub client lays it out (`models--owner--name/{blobs/<sha256>,
refs/main, snapshots/<commit>/<file> -> ../../blobs/<sha256>}`), checked with huggingface_hub's own
`scan_cache_dir` / `try_to_load_from_cache`, under HF_HUB_OFFLINE=1 with HF_HUB_CACHE pointed at it."""

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy

import tiny_hf
from musilingo_jax import build, hub
from musilingo_jax.convert.pth import read_projection, save_musilingo_pth
from musilingo_jax.convert.rules import ConversionError
from musilingo_jax.main import convert_hf, generate

D_ENC, D_LLM = tiny_hf.D_ENC, tiny_hf.D_LLM
RELEASE, PTH_REPO, LLM, MERT = "owner/musilingo-release", "owner/musilingo-pth", "owner/tiny-llm", "owner/tiny-mert"


def cache_repo(cache: Path, repo_id: str, files: dict[str, bytes], *, branch: str = "main") -> str:
  """Puts `files` ({path in repo: bytes}) into a Hub cache as huggingface_hub does: each file's bytes once in
  blobs/<sha256>, the commit's tree in snapshots/<commit>/ as relative symlinks to the blobs, and
  refs/<branch> holding the commit hash. Returns the commit hash."""
  repo = cache / ("models--" + repo_id.replace("/", "--"))
  commit = hashlib.sha1(repo_id.encode() + b"".join(sorted(hashlib.sha256(d).digest() for d in files.values())))
  commit = commit.hexdigest()
  for rel, data in files.items():
    sha = hashlib.sha256(data).hexdigest()
    blob = repo / "blobs" / sha
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(data)
    link = repo / "snapshots" / commit / rel
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(os.path.relpath(blob, link.parent))
  (repo / "refs").mkdir(parents=True, exist_ok=True)
  (repo / "refs" / branch).write_text(commit)
  return commit


def folder_files(d: Path) -> dict[str, bytes]:
  return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def release_files(kernel: np.ndarray, bias: np.ndarray, *, prefix: str = "model.") -> dict[str, bytes]:
  """A Hugging Face-layout MusiLingo release: the whole model saved in two shards with an index; the
  projection (torch layout, under `prefix`) in the second shard, beside fake frozen tensors."""
  rng = np.random.default_rng(1)
  shard1 = {f"{prefix}llama_model.model.embed_tokens.weight": rng.standard_normal((8, D_LLM)).astype(np.float32),
            f"{prefix}llama_model.model.norm.weight": np.ones(D_LLM, np.float32)}
  shard2 = {f"{prefix}llama_proj.weight": np.ascontiguousarray(kernel.T), f"{prefix}llama_proj.bias": bias,
            f"{prefix}mert_model.feature_projection.weight": rng.standard_normal((4, 4)).astype(np.float32)}
  names = {1: "model-00001-of-00002.safetensors", 2: "model-00002-of-00002.safetensors"}
  files = {names[1]: safetensors.numpy.save(shard1), names[2]: safetensors.numpy.save(shard2)}
  weight_map = {k: names[1] for k in shard1} | {k: names[2] for k in shard2}
  files["model.safetensors.index.json"] = json.dumps({"metadata": {"total_size": 0},
                                                      "weight_map": weight_map}).encode()
  files["config.json"] = json.dumps({"model_type": "musilingo", "architectures": ["MusiLingoModel"]}).encode()
  return files


def write_folder(d: Path, files: dict[str, bytes]) -> Path:
  for rel, data in files.items():
    (d / rel).parent.mkdir(parents=True, exist_ok=True)
    (d / rel).write_bytes(data)
  return d


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory):
  """(root with the tiny models, converted/ and proj.npz; the Hub cache holding them as Hub repos)."""
  root = tmp_path_factory.mktemp("hub")
  tiny_hf.converted_tiny_models(root)
  with np.load(root / "proj.npz") as z:
    kernel, bias = z["kernel"], z["bias"]
  save_musilingo_pth(root / "checkpoint_5.pth", kernel, bias)
  cache = root / "hf-cache"
  cache_repo(cache, LLM, folder_files(root / "llm"))
  cache_repo(cache, MERT, folder_files(root / "encoder"))
  cache_repo(cache, RELEASE, release_files(kernel, bias))
  cache_repo(cache, PTH_REPO, {"checkpoint_5.pth": (root / "checkpoint_5.pth").read_bytes(), "README.md": b"x"})
  return root, cache


@pytest.fixture
def offline_cache(hub_cache, monkeypatch):
  root, cache = hub_cache
  monkeypatch.setenv("HF_HUB_CACHE", str(cache))
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  return root, cache


def test_the_fake_cache_is_one_the_hub_client_reads(offline_cache):
  import huggingface_hub
  root, cache = offline_cache
  info = huggingface_hub.scan_cache_dir(cache)
  assert not info.warnings
  repos = {r.repo_id: r for r in info.repos}
  assert set(repos) == {RELEASE, PTH_REPO, LLM, MERT}
  for repo_id, r in repos.items():
    (rev,) = r.revisions
    assert rev.refs == frozenset({"main"}) and rev.snapshot_path.is_dir()
  assert {f.file_name for f in next(iter(repos[RELEASE].revisions)).files} >= {
      "model.safetensors.index.json", "model-00002-of-00002.safetensors"}
  got = huggingface_hub.try_to_load_from_cache(LLM, "config.json", cache_dir=cache)
  assert isinstance(got, str) and Path(got).read_bytes() == (root / "llm" / "config.json").read_bytes()
  # And hub.resolve gives the client's snapshot folder for an id, the path itself for a local path.
  assert hub.resolve(LLM, what="--llm") == os.path.dirname(got)
  assert hub.resolve(str(root / "llm"), what="--llm") == str(root / "llm")
  assert hub.resolve(f"{PTH_REPO}/checkpoint_5.pth", what="--projection").endswith("/checkpoint_5.pth")


def test_hub_id_syntax(tmp_path, monkeypatch):
  assert hub.parse_id("owner/name") == ("owner/name", None, None)
  assert hub.parse_id("owner/name@v1.0") == ("owner/name", "v1.0", None)
  assert hub.parse_id("hf://owner/name@abc/sub/file.pth") == ("owner/name", "abc", "sub/file.pth")
  for local in ("/abs/path", "./rel/x", "../x/y", "~/x/y", "gs://bucket/x", "single", "runs/proj.npz", "a//b"):
    assert not hub.is_hub_id(local), local
  monkeypatch.chdir(tmp_path)
  (tmp_path / "owner" / "name").mkdir(parents=True)
  assert not hub.is_hub_id("owner/name")  # an existing local path wins
  assert hub.is_hub_id("hf://owner/name")


def test_release_folder_reads_only_the_projection_shard(hub_cache, tmp_path):
  root, _ = hub_cache
  with np.load(root / "proj.npz") as z:
    kernel, bias = z["kernel"], z["bias"]
  files = release_files(kernel, bias)
  files["model-00001-of-00002.safetensors"] = b"not a safetensors file"  # never opened
  release = write_folder(tmp_path / "release", files)
  k, b = read_projection(release, dims=(D_ENC, D_LLM))
  np.testing.assert_array_equal(k, kernel)
  np.testing.assert_array_equal(b, bias)
  assert k.dtype == b.dtype == np.float32
  # One .safetensors file, and a folder with a single model.safetensors, under another prefix.
  one = {f"musilingo.llama_proj.{n}": v for n, v in (("weight", kernel.T.copy()), ("bias", bias))}
  safetensors.numpy.save_file(one, str(tmp_path / "proj.safetensors"))
  np.testing.assert_array_equal(read_projection(tmp_path / "proj.safetensors")[0], kernel)
  write_folder(tmp_path / "single", {"model.safetensors": safetensors.numpy.save(one)})
  np.testing.assert_array_equal(build.load_projection(str(tmp_path / "single"))[1], bias)


@pytest.mark.parametrize("case,expect", [
    ("no_keys", "no llama_proj.weight / llama_proj.bias keys under any prefix: not a MusiLingo checkpoint "
                "(keys found: a.weight, b.bias)"),
    ("two_prefixes", "ambiguous: llama_proj.weight under 2 prefixes ['model.llama_proj.weight', "
                     "'other.llama_proj.weight']"),
    ("shape", "the projection maps 32 -> 64 (model.llama_proj.weight (64, 32)), the models need 16 (encoder dim) "
              "-> 64 (LLM dim)"),
    ("no_bias", "model.llama_proj.weight without model.llama_proj.bias"),
    ("missing_shard", "model.llama_proj.weight is in model-00002-of-00002.safetensors, which is missing from"),
    ("empty", "not a MusiLingo release folder: expected model.safetensors, or shards with "
              "model.safetensors.index.json, or one .pth / .npz (found: README.md)"),
])
def test_release_errors_name_the_folder(tmp_path, case, expect):
  w, b = np.zeros((D_LLM, D_ENC), np.float32), np.zeros(D_LLM, np.float32)
  d = tmp_path / case
  dims = None
  if case == "no_keys":
    write_folder(d, {"model.safetensors": safetensors.numpy.save({"a.weight": w, "b.bias": b})})
  elif case == "two_prefixes":
    write_folder(d, {"model.safetensors": safetensors.numpy.save(
        {"model.llama_proj.weight": w, "model.llama_proj.bias": b, "other.llama_proj.weight": w,
         "other.llama_proj.bias": b})})
  elif case == "shape":
    write_folder(d, release_files(w.T, b))
    dims = (16, D_LLM)
  elif case == "no_bias":
    write_folder(d, {"model.safetensors": safetensors.numpy.save({"model.llama_proj.weight": w})})
  elif case == "missing_shard":
    files = release_files(w.T, b)
    del files["model-00002-of-00002.safetensors"]
    write_folder(d, files)
  else:
    write_folder(d, {"README.md": b"x"})
  with pytest.raises(ConversionError) as e:
    read_projection(d, dims=dims)
  assert str(d) in str(e.value) and expect in str(e.value), str(e.value)
  assert "\n" not in str(e.value)


def _answer(capsys, argv) -> list[int]:
  assert generate.main(argv) == 0
  out = capsys.readouterr().out
  return [json.loads(line)["token_ids"] for line in out.splitlines() if line.startswith("{")]


def test_convert_and_generate_from_hub_ids(offline_cache, tmp_path, capsys):
  root, cache = offline_cache
  out = tmp_path / "converted"
  assert convert_hf.main(["--llm", LLM, "--mert", MERT, "--out", str(out), "--no-progress"]) == 0
  meta = json.loads((out / "meta.json").read_text())
  assert all(str(cache) in src and "/snapshots/" in src for src in meta["sources"].values())
  for name in ("encoder_config.json", "llm_config.json", "tokenizer/tokenizer.json"):
    assert (out / name).read_bytes() == (root / "converted" / name).read_bytes(), name

  feats = tmp_path / "feats.npy"
  np.save(feats, np.random.default_rng(0).standard_normal((3, D_ENC)).astype(np.float32))
  ask = ["--features", str(feats), "--question", "w5 w7", "--greedy", "--max-new-tokens", "4", "--json",
         "--dtype", "float32"]
  want = _answer(capsys, ["--checkpoint", str(root / "converted"), "--projection", str(root / "proj.npz")] + ask)
  assert _answer(capsys, ["--checkpoint", str(out), "--projection", RELEASE] + ask) == want
  assert _answer(capsys, ["--checkpoint", str(out), "--projection", f"{PTH_REPO}/checkpoint_5.pth"] + ask) == want
  assert len(want) == 1 and len(want[0]) > 0


def test_id_missing_from_the_cache_is_one_line_and_exit_2(offline_cache, tmp_path, capsys, monkeypatch):
  root, cache = offline_cache

  def fail(*_a, **_k):
    raise AssertionError("a model was loaded")
  monkeypatch.setattr(build, "load_for_inference", fail)
  monkeypatch.setattr(convert_hf, "convert_musilingo", fail)
  assert convert_hf.main(["--llm", "lmsys/vicuna-7b-v1.5", "--out", str(tmp_path / "o")]) == 2
  err = capsys.readouterr().err
  assert err.splitlines() == [
      f"convert: error: --llm lmsys/vicuna-7b-v1.5: no such local path, and not in the Hugging Face cache ({cache}) "
      "with HF_HUB_OFFLINE=1 (download it once online: `hf download lmsys/vicuna-7b-v1.5`; or set HF_HUB_CACHE to "
      "the cache that holds it)"]
  feats = tmp_path / "f.npy"
  np.save(feats, np.zeros((2, D_ENC), np.float32))
  assert generate.main(["--checkpoint", str(root / "converted"), "--projection", "owner/not-cached@v2",
                        "--features", str(feats), "--question", "q"]) == 2
  (line,) = capsys.readouterr().err.splitlines()
  assert line.startswith(f"generate: error: --projection owner/not-cached@v2: no such local path, and not in the "
                         f"Hugging Face cache ({cache}) with HF_HUB_OFFLINE=1 (download it once online: `hf "
                         f"download owner/not-cached --revision v2`")
