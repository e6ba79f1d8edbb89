"""Ask MusiLingo about one audio file (one question, or an interactive multi-turn chat).

  musilingo-generate --workdir /runs/musicqa --audio song.wav --question "What is the tempo?"
  musilingo-generate --checkpoint /ckpt/musilingo-converted --projection checkpoint_5.pth \
      --audio song.wav --question "Describe the music." --greedy --json
  musilingo-generate --workdir /runs/musicqa --audio song.wav --chat
  (python scripts/generate.py ... is the same program)

--projection takes our checkpoint's projection (.npz), a released MusiLingo .pth ({"model": {"llama_proj.weight",
"llama_proj.bias"}}), a .safetensors file or a Hugging Face-layout release folder (sharded safetensors whose keys
include <prefix>llama_proj.weight / .bias; only those two tensors are read), or a Hub id of one
(owner/name[@revision][/file], resolved through the Hugging Face cache; HF_HUB_OFFLINE=1 reads the cache only).
Sampling defaults are the reference's (temperature 0.1, top_p 0.5, 300 new tokens).
--json prints one JSON object: question, answer, raw_text, token_ids. The frozen weights load in --dtype
(default bfloat16), split over all local devices; the memory line goes to stderr.
Every path may be a gs:// URL (--workdir, --checkpoint, --projection, --audio, --features).
Inputs are checked before the model loads: a missing file or object, an unreachable bucket, a folder that is
not a converted checkpoint or a training run, a projection that does not fit the models, an --audio file that
does not decode (with the decoders' reasons) or --features that are not a [T', D_enc] array are one line
`generate: error: ...` and exit status 2.
"""

# jax, numpy and the model modules are imported inside the functions: --help stays instant.

from __future__ import annotations

import argparse
import json
import sys

from musilingo_jax.main import cli


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  cli.add_model_source(p)
  audio = p.add_mutually_exclusive_group(required=True)
  audio.add_argument("--audio", help="an audio file (wav/flac/mp3/ogg), resampled to 24 kHz mono")
  audio.add_argument("--features", help="a .npy of precomputed pooled encoder features [T', D_enc]")
  p.add_argument("--max-seconds", type=float, default=30.0, help="use the first N seconds of --audio (0 = all)")
  p.add_argument("--question", help="the question (omit with --chat, or for a stage-1 captioning model)")
  p.add_argument("--chat", action="store_true", help="interactive multi-turn questions about the clip")
  cli.add_sampling(p)
  cli.add_audio_normalize(p)
  p.add_argument("--json", action="store_true", help="print one JSON object (answer text and token ids)")
  args = p.parse_args(argv)
  cli.check_model_source(p, args)
  return args


def load_audio(path: str, max_seconds: float):
  from musilingo_jax import storage
  from musilingo_jax.data import audio as audio_lib
  path = storage.stage(path)  # audio decoders read local files
  x, rate = audio_lib.read_audio(path)
  if max_seconds > 0:
    x = x[:int(max_seconds * rate)]
  return audio_lib.load_window(path, clip=(x, rate)).audio


def read_inputs(args: argparse.Namespace, info: dict):
  """The clip, read and checked before the model loads -> ("audio", 24 kHz window) or ("features",
  [T', D_enc] float32). InputError (one line): --audio that does not decode (each decoder's reason) or is
  too short, --features that are not a float .npy of rank 2 with the encoder's width (info["dims"], when
  known), a stage-2 model asked nothing."""
  import numpy as np
  from musilingo_jax import storage
  from musilingo_jax.data import audio as audio_lib
  if info["template"] and not args.question and not args.chat:
    raise cli.InputError("--question is required (or use --chat)")
  if args.features:
    try:
      features = np.load(storage.stage(args.features), allow_pickle=False)
    except (ValueError, OSError) as e:
      raise cli.InputError(f"--features {args.features}: not a .npy array ({type(e).__name__}: {e})") from None
    d_enc = info["dims"][0] if info["dims"] else "D_enc"
    if features.ndim != 2 or not np.issubdtype(features.dtype, np.floating) or 0 in features.shape:
      raise cli.InputError(f"--features {args.features}: a {features.dtype} array of shape {features.shape}; "
                           f"expected pooled encoder features of one clip, float [T', {d_enc}]")
    if info["dims"] and features.shape[1] != info["dims"][0]:
      raise cli.InputError(f"--features {args.features}: shape {features.shape}; the encoder's width is "
                           f"{info['dims'][0]} (expected [T', {info['dims'][0]}])")
    return "features", features.astype(np.float32)
  local = storage.stage(args.audio)
  reason = audio_lib.not_audio_reason(local)
  if reason:
    raise cli.InputError(f"--audio {args.audio}: {reason}")
  try:
    return "audio", load_audio(local, args.max_seconds)
  except audio_lib.BadAudio as e:
    raise cli.InputError(f"--audio {args.audio}: {e.reason}" + (f" ({e.detail})" if e.detail else "")) from None


def main(argv=None) -> int:
  args = parse_args(argv)
  code, info = cli.checked("generate", lambda: cli.check_model_inputs(
      args, read={"--audio": args.audio, "--features": args.features}))
  if code:
    return code
  code, got = cli.checked("generate", lambda: read_inputs(args, info))
  if code:
    return code
  kind, clip = got
  from musilingo_jax import generate as gen, prompts
  model, tokenizer, config = cli.load_model(args, "generate", stream=sys.stderr)
  prompt_cfg = prompts.PromptConfig()
  if config is not None:
    from musilingo_jax.build import prompt_config
    prompt_cfg = prompt_config(config)
  features = clip if kind == "features" else gen.audio_features(model, clip,
                                                                 normalize=cli.audio_normalize(args, config))
  gen_kwargs = dict(greedy=args.greedy, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                    top_p=args.top_p)

  if not prompt_cfg.template:  # stage-1 model: a caption, no question, no chat
    if args.chat or args.question:
      print("generate: this model was trained without the instruction template (stage 1): it writes a caption; "
            "--question/--chat are ignored", file=sys.stderr)
    batch = gen.prompt_batch(tokenizer, [None], n_audio_tokens=features.shape[0], prompt_cfg=prompt_cfg)
    batch["features"] = features[None]
    _show(args, None, gen.generate(model, batch, tokenizer=tokenizer, seed=args.seed, **gen_kwargs)[0])
    return 0

  chat = gen.Chat(model, tokenizer, features=features, prompt_cfg=prompt_cfg, seed=args.seed, **gen_kwargs)
  if not args.chat:
    _show(args, args.question, chat.ask(args.question))
    return 0
  print("Ask about the clip (empty line or Ctrl-D to quit, /reset to start over).", file=sys.stderr)
  question = args.question
  while True:
    if question is None:
      try:
        question = input("Human: ").strip()
      except EOFError:
        break
      if not question:
        break
      if question == "/reset":
        chat.reset()
        question = None
        continue
    _show(args, question, chat.ask(question), prefix="Assistant: ")
    question = None
  return 0


def _show(args, question, result, prefix: str = "") -> None:
  """Prints a generate.GenerationResult: its text, or with --json one JSON object."""
  if args.json:
    print(json.dumps({"question": question, "answer": result.text, "raw_text": result.raw_text,
                      "token_ids": result.token_ids}, ensure_ascii=False), flush=True)
  else:
    print(prefix + result.text, flush=True)


def run() -> None:
  """Console-script entry point (musilingo-generate)."""
  sys.exit(main())


if __name__ == "__main__":
  run()
