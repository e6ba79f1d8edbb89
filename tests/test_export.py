"""The export folder (musilingo_jax/export.py via musilingo-export) as a PyTorch user meets it: the merged LLM
as save_pretrained lays it out (sharded, with an index) and loadable by transformers, a PEFT adapter that gives
the merged model's logits over the exported base, the model card and musilingo_config.json, and
musilingo_jax.torch_inference answering token for token as the JAX model does (greedy, multi-turn)."""

import json

import numpy as np
import peft
import pytest
import safetensors.numpy
import torch
import transformers
from flax import nnx

import tiny_hf
from musilingo_jax import build, generate as gen
from musilingo_jax.main import export_pytorch
from musilingo_jax.torch_inference import MusiLingoTorch

N_NEW = 10


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A LoRA run (frozen parts from a converted tiny checkpoint, feature statistics on) and its float32 export
  with llm_base/, shards of at most 20 kB: (workdir, export dir, the run's model loaded in float32, tokenizer)."""
  root = tmp_path_factory.mktemp("export")
  tiny_hf.converted_tiny_models(root)
  c = tiny_hf.run_config(root / "demo", str(root / "converted"))
  workdir = root / "run"
  workdir.mkdir()
  tiny_hf.fake_run(workdir, c, scale=0.3)  # LoRA deltas about a trained run's size
  out = root / "exported"
  assert export_pytorch.main(["--workdir", str(workdir), "--out", str(out), "--dtype", "float32", "--base-llm",
                              "--max-shard-size", "0.00002"]) == 0
  model, tok, _ = build.load_for_inference(workdir=str(workdir), dtype="float32")
  return workdir, out, model, tok


def test_layout_card_and_config(run):
  _, out, model, tok = run
  for name in ("musilingo_config.json", "README.md", "projection.safetensors", "musilingo_checkpoint.pth",
               "llm/config.json", "llm/generation_config.json", "llm/model.safetensors.index.json",
               "llm_base/model.safetensors.index.json", "adapter/adapter_config.json",
               "adapter/adapter_model.safetensors", "encoder/config.json", "encoder/preprocessor_config.json"):
    assert (out / name).is_file(), name
  index = json.loads((out / "llm" / "model.safetensors.index.json").read_text())
  shards = sorted(set(index["weight_map"].values()))
  assert len(shards) > 1 and all((out / "llm" / s).is_file() for s in shards)
  assert not (out / "llm" / "model.safetensors").exists()
  assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
  assert index["metadata"]["total_size"] == sum(
      v.nbytes for s in shards for v in safetensors.numpy.load_file(out / "llm" / s).values())

  cfg = json.loads((out / "musilingo_config.json").read_text())
  assert cfg["pool_frames"] == 4 and cfg["parts"]["adapter"] == "adapter" and cfg["lora"]["rank"] == 4
  assert cfg["prompt"]["before_audio"] == "###Human: <Audio>" and cfg["prompt"]["end_sym"] == "###"
  assert cfg["tokens"]["stop_sequences"] == [list(s) for s in gen.stop_sequences_for(tok)]
  norm = cfg["projection"]["feature_norm"]
  np.testing.assert_allclose(norm["mean"], np.asarray(model.feature_norm.mean[...]), atol=1e-7)
  gen_cfg = json.loads((out / "llm" / "generation_config.json").read_text())
  assert (gen_cfg["temperature"], gen_cfg["top_p"], gen_cfg["max_new_tokens"]) == (0.1, 0.5, 300)
  assert gen_cfg["eos_token_id"][0] == tok.eos_id
  transformers.GenerationConfig.from_pretrained(out / "llm")  # transformers accepts it

  # The projection: feature standardisation folded in, torch layout, float32.
  proj = safetensors.numpy.load_file(out / "projection.safetensors")
  kernel, bias = (np.asarray(x) for x in model.projection_weights())
  np.testing.assert_array_equal(proj["llama_proj.weight"], kernel.T)
  np.testing.assert_array_equal(proj["llama_proj.bias"], bias)
  card = (out / "README.md").read_text()
  assert card.startswith("---\n") and "MusiLingoTorch.from_export" in card and "`adapter/`" in card


def _logits(lm, ids):
  with torch.no_grad():
    return lm(input_ids=torch.as_tensor(ids)).logits.numpy()


def test_peft_adapter_gives_the_merged_logits(run):
  _, out, model, _ = run
  merged = transformers.LlamaForCausalLM.from_pretrained(out / "llm").eval()
  base = transformers.LlamaForCausalLM.from_pretrained(out / "llm_base").eval()
  adapted = peft.PeftModel.from_pretrained(base, out / "adapter").eval()
  ids = np.random.default_rng(0).integers(3, model.cfg.llm.vocab_size, (2, 12))
  want = _logits(merged, ids)
  np.testing.assert_allclose(_logits(adapted, ids), want, atol=1e-5, rtol=0)
  # The adapters are not a no-op: without them the base differs.
  with adapted.disable_adapter():
    assert np.abs(_logits(adapted, ids) - want).max() > 1e-3
  # The merged LLM is ours: its logits are our LLM's (float32).
  ours = np.asarray(model.llm(input_ids=ids)[0])
  np.testing.assert_allclose(want, ours, atol=1e-4, rtol=0)


@pytest.mark.parametrize("llm", ["merged", "adapter"])
def test_torch_inference_answers_as_we_do(run, llm):
  _, out, model, tok = run
  m = MusiLingoTorch.from_export(out, llm=llm)
  audio = (0.3 * np.random.default_rng(1).standard_normal(24000 * 2)).astype(np.float32)
  feats = gen.audio_features(model, audio)
  np.testing.assert_allclose(m.encode(audio).numpy(), feats, atol=1e-4, rtol=1e-4)
  chat = gen.Chat(model, tok, audio=audio, prompt_cfg=build.prompt_config(tiny_hf.run_config("")), greedy=True,
                  max_new_tokens=N_NEW)
  history = []
  for question in ("w5 w7 w9", "w11 w13"):
    ours = chat.ask(question)
    theirs = m.generate_ids(question, audio=audio, history=history, greedy=True, max_new_tokens=N_NEW)
    assert theirs == ours.token_ids, question
    assert m.answer(question, features=feats, history=history, greedy=True, max_new_tokens=N_NEW) == ours.text
    history.append((question, ours.text))


def test_adapter_of_a_scanned_llm_gives_its_logits(tmp_path):
  """Scanned layers (stacked [L, ...] adapters, config.model.scan_layers): the adapter file has one entry per
  layer, and PEFT over the unmerged base gives our adapted LLM's logits."""
  import jax
  from flax import nnx
  from musilingo_jax import export as export_lib
  from musilingo_jax.convert.hf import export_pretrained
  from musilingo_jax.models import layers, llama
  lora = layers.LoRAConfig(rank=2, alpha=4.0, dropout=0.0, target_modules=("q_proj", "v_proj"))
  lm = llama.Llama(llama.LlamaConfig.tiny(scan_layers=True), rngs=nnx.Rngs(0), lora=lora)
  rng = np.random.default_rng(0)
  for _, v in nnx.to_flat_state(nnx.state(lm, nnx.LoRAParam)):
    v.set_value(jax.numpy.asarray(0.1 * rng.standard_normal(v.get_value().shape), np.float32))
  export_pretrained(llama.HF_KIND, lm, tmp_path / "base", "float32", merge_lora=False)
  export_lib.write_adapter(lm, tmp_path / "adapter", base_model=None)
  keys = safetensors.numpy.load_file(tmp_path / "adapter" / "adapter_model.safetensors")
  assert len(keys) == 2 * 2 * lm.cfg.num_hidden_layers
  adapted = peft.PeftModel.from_pretrained(transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base"),
                                           tmp_path / "adapter").eval()
  ids = rng.integers(3, lm.cfg.vocab_size, (2, 9))
  np.testing.assert_allclose(_logits(adapted, ids), np.asarray(lm(input_ids=ids)[0]), atol=1e-4, rtol=0)


def test_new_audio_is_standardised_as_the_run_heard_it(run, tmp_path):
  """MusicInstruct / MusicCaps runs heard their clips through MERT's feature extractor (do_normalize): generate,
  serve and the export apply the same to new audio. One rule (build.audio_normalize) decides it; ours and
  torch_inference's standardisation give the same features, which no gain or offset of the clip changes."""
  from musilingo_jax.main import cli, generate as generate_main
  workdir, out, model, _ = run
  c = tiny_hf.run_config("")
  assert not build.audio_normalize(c)                       # the demo's clips skip the extractor
  for dataset in ("musicqa", "lp-musiccaps-msd"):
    c.data.dataset = dataset
    assert not build.audio_normalize(c)
  c.data.dataset = "musicinstruct"
  assert build.audio_normalize(c)                           # a random encoder: transformers' default (true)
  off = tmp_path / "off"
  off.mkdir()
  (off / "preprocessor_config.json").write_text(json.dumps({"do_normalize": False}))
  c.model.checkpoint = str(off)
  assert not build.audio_normalize(c)                       # the MERT checkpoint's own setting
  c.model.checkpoint = ""

  args = lambda *a: generate_main.parse_args(["--audio", "x.wav", *a])
  assert cli.audio_normalize(args("--workdir", "w"), c)                       # auto: the run's setting
  assert not cli.audio_normalize(args("--checkpoint", "k", "--projection", "p.npz"), c)  # no run: off
  assert cli.audio_normalize(args("--checkpoint", "k", "--projection", "p.npz", "--normalize-audio", "on"), None)
  assert not cli.audio_normalize(args("--workdir", "w", "--normalize-audio", "off"), c)

  class Heard(nnx.Module):  # what the encoder is handed, as [1, S, 1] "features"
    def audio_features(self, batch):
      return batch["audio"][..., None]

  audio = (0.3 * np.random.default_rng(2).standard_normal(24000) + 0.05).astype(np.float32)
  np.testing.assert_array_equal(gen.audio_features(Heard(), audio)[:, 0], audio)
  heard = gen.audio_features(Heard(), audio, normalize=True)[:, 0]
  assert abs(heard.mean()) < 1e-5 and abs(heard.std() - 1) < 1e-4
  np.testing.assert_allclose(gen.audio_features(Heard(), 5 * audio + 0.2, normalize=True)[:, 0], heard, atol=1e-4)
  m = MusiLingoTorch.from_export(out, llm="merged")
  m.config["audio"]["normalize"] = True                     # as a MusicInstruct run's export records it
  np.testing.assert_allclose(m.normalize(audio), heard, atol=1e-6)
  np.testing.assert_allclose(m.encode(audio).numpy(), gen.audio_features(model, audio, normalize=True), atol=1e-4,
                             rtol=1e-4)
