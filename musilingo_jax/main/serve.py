"""A web demo of a trained MusiLingo: upload or record a clip, see its spectrogram, chat about it.

  musilingo-serve --workdir /runs/demo                       # http://127.0.0.1:7860
  musilingo-serve --checkpoint /ckpt/converted --projection checkpoint_5.pth --port 8080 --dtype float32
  (python scripts/serve.py ... is the same program)

A Gradio app (`build_app`): an audio input (upload or microphone), the spectrogram of what the model hears,
a chat whose answers appear token by token as they are decoded (generate.Stream: the same decode loop as
musilingo-generate, so the same ids), the sampling settings (temperature, top-p, new-token budget, greedy),
and a reset button. The clip is encoded once when it arrives; each question continues the chat about it as
`musilingo-generate --chat` does (generate.Chat); a new clip starts a new chat. A stage-1 (captioning) model
writes a caption for every message.

Limits: the server listens on 127.0.0.1 unless --host says otherwise and never opens a public share link;
an upload over --max-upload-mb is refused by Gradio; a clip longer than --max-clip-seconds, an empty file, a
file that is not audio (or under a second) gets a message on the page and the server keeps serving. Of an
accepted clip the model hears the first --max-seconds (default 30 s, the reference's window), as
musilingo-generate --max-seconds. Every model call (encoding a clip, answering) runs one at a time.

Speed on CPU: the decode loop compiles once per prompt-length bucket (PROMPT_BUCKET positions) and new-token
budget, so the first answer waits for a compilation (10-20 s for the demo's SmolLM2 on 2 cores); later
turns in the same bucket start within about a second, and tokens then appear as they are decoded.
No telemetry (Gradio analytics off) and nothing fetched from the internet: the page's fonts are Gradio's
bundled ones.
"""

# jax, gradio and the model modules are imported inside the functions: --help stays instant.

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from musilingo_jax.main import cli

PROG = "serve"
TITLE = "MusiLingo"
# Every model call shares one queue slot: the model is used by one event at a time.
_MODEL_QUEUE = "model"
# The status line's prefixes (tests and users look for them).
NO_CLIP = "Upload or record a clip (wav, flac, ogg or mp3), then ask about it."
REFUSED = "Refused"
# Prompts are left-padded to a multiple of this (generate.Chat's prompt_bucket): a chat's prompt grows every
# turn, and each new length would compile the decode loop again (~10 s on CPU for the demo's SmolLM2).
PROMPT_BUCKET = 64


@dataclasses.dataclass(frozen=True)
class Limits:
  max_seconds: float = 30.0         # the model hears the first max_seconds of a clip (0 = all of it)
  max_clip_seconds: float = 600.0   # longer clips are refused
  max_upload_mb: float = 100.0      # Gradio refuses larger uploads


@dataclasses.dataclass(frozen=True)
class Sampling:
  """The sampling settings the page starts with (cli.add_sampling's defaults: the reference's)."""
  greedy: bool = False
  temperature: float = 0.1
  top_p: float = 0.5
  max_new_tokens: int = 300
  seed: int = 0


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  cli.add_model_source(p)
  cli.add_sampling(p, greedy_help="start with argmax decoding ticked (the page can change every setting but "
                                  "the seed)")
  cli.add_audio_normalize(p)
  p.add_argument("--host", default="127.0.0.1",
                 help="address to listen on (default %(default)s: this machine only; 0.0.0.0 = every interface)")
  p.add_argument("--port", type=int, default=7860, help="port to listen on (default %(default)s)")
  p.add_argument("--max-seconds", type=float, default=Limits.max_seconds,
                 help="the model hears the first N seconds of a clip (default %(default)s, the reference's "
                      "window; 0 = all)")
  p.add_argument("--max-clip-seconds", type=float, default=Limits.max_clip_seconds,
                 help="refuse clips longer than this (default %(default)s)")
  p.add_argument("--max-upload-mb", type=float, default=Limits.max_upload_mb,
                 help="refuse uploads larger than this many MB (default %(default)s)")
  args = p.parse_args(argv)
  cli.check_model_source(p, args)
  if not 1 <= args.port <= 65535:
    p.error(f"--port {args.port}: expected 1..65535")
  for flag in ("max_seconds", "max_clip_seconds", "max_upload_mb"):
    if getattr(args, flag) < 0 or (flag != "max_seconds" and getattr(args, flag) == 0):
      p.error(f"--{flag.replace('_', '-')} {getattr(args, flag)}: expected a positive number")
  return args


# ---- what the page shows ----------------------------------------------------------------------------------

# Anchors of a magma-like colour map (dark = quiet, light = loud).
_COLORS = ((0.0, (0, 0, 4)), (0.25, (80, 18, 123)), (0.5, (182, 54, 121)), (0.75, (251, 136, 97)),
           (1.0, (252, 253, 191)))


def spectrogram_image(audio, rate: int, *, width: int = 800, height: int = 200, top_db: float = 80.0):
  """An RGB image (uint8 [height, width, 3]) of `audio`'s log-magnitude spectrogram (mono float [S] at `rate`):
  time left to right over the whole clip, frequency on a mel scale from 0 to rate / 2 bottom to top, the
  loudest `top_db` decibels in colour. numpy only (no plotting library)."""
  import numpy as np
  x = np.asarray(audio, np.float32)
  n_fft = 1024
  if len(x) < n_fft:
    x = np.pad(x, (0, n_fft - len(x)))
  hop = max(1, (len(x) - n_fft) // max(1, width - 1))
  starts = np.minimum(np.arange(width) * hop, len(x) - n_fft)
  frames = x[starts[:, None] + np.arange(n_fft)[None]] * np.hanning(n_fft).astype(np.float32)
  mag = np.abs(np.fft.rfft(frames, axis=1))  # [width, n_fft / 2 + 1]
  db = 20 * np.log10(mag + 1e-6)
  db = np.clip(db - db.max(), -top_db, 0) / top_db + 1  # 0 (quiet) .. 1 (loudest)
  mel = lambda f: 2595 * np.log10(1 + f / 700)  # noqa: E731
  mels = np.linspace(0, mel(rate / 2), height)
  bins = (700 * (10 ** (mels / 2595) - 1)) / (rate / 2) * (n_fft // 2)  # fractional bin of each row
  lo = np.floor(bins).astype(int).clip(0, n_fft // 2)
  hi = np.minimum(lo + 1, n_fft // 2)
  w = (bins - lo)[None]
  rows = db[:, lo] * (1 - w) + db[:, hi] * w  # [width, height]
  v = rows.T[::-1]  # low frequencies at the bottom
  stops = np.array([s for s, _ in _COLORS])
  rgb = np.stack([np.interp(v, stops, [c[k] for _, c in _COLORS]) for k in range(3)], axis=-1)
  return rgb.round().astype(np.uint8)


def _clock(seconds: float) -> str:
  m, s = divmod(int(round(seconds)), 60)
  return f"{m}:{s:02d}"


class Demo:
  """The page's behaviour without the page (the handlers `build_app` wires to it; tests call them directly).

  A clip's state (gr.State) is a dict: name, seconds (the whole clip), heard (seconds the model hears),
  features (the pooled encoder features, computed once), history (the chat's (question, answer) turns).
  """

  def __init__(self, model, tokenizer, prompt_cfg=None, *, limits: Limits = Limits(),
               sampling: Sampling = Sampling(), prompt_bucket: int | None = PROMPT_BUCKET,
               normalize_audio: bool = False):
    from musilingo_jax import prompts
    self.model, self.tokenizer = model, tokenizer
    self.prompt_cfg = prompt_cfg if prompt_cfg is not None else prompts.PromptConfig()
    self.limits, self.sampling, self.prompt_bucket = limits, sampling, prompt_bucket
    self.normalize_audio = normalize_audio  # standardise clips as the run's encoder heard them (cli.audio_normalize)

  # -- a clip arrives
  def check_clip(self, path: str):
    """The audio the model hears (24 kHz mono float32 [S]) and the clip's length in seconds, or ValueError
    with the message the page shows: not audio, empty, under a second, NaN, or longer than the cap."""
    import soundfile as sf

    from musilingo_jax.data import audio as audio_lib
    name = os.path.basename(path)
    cap = self.limits.max_clip_seconds
    too_long = (f"{REFUSED}: {name} is {{}} long; this demo takes clips up to {_clock(cap)} "
                f"({cap:g} s). Cut it shorter and upload it again.")
    try:
      info = sf.info(path)  # the length from the header: a long file is refused before it is decoded
      if info.samplerate > 0 and info.frames / info.samplerate > cap:
        raise ValueError(too_long.format(_clock(info.frames / info.samplerate)))
    except (sf.LibsndfileError, RuntimeError, TypeError):
      pass  # not something libsndfile opens: read_audio says what it is
    try:
      x, rate = audio_lib.read_audio(path)
      seconds = len(x) / rate
      if seconds > cap:
        raise ValueError(too_long.format(_clock(seconds)))
      if self.limits.max_seconds > 0:
        x = x[:int(self.limits.max_seconds * rate)]
      audio = audio_lib.load_window(path, clip=(x, rate)).audio
    except audio_lib.BadAudio as e:
      why = {"empty": "the file is empty",
             "missing_file": "the upload did not arrive",
             "too_short": "it is shorter than a second",
             "nan": "it holds NaN or infinite samples"}.get(e.reason, "it is not an audio file this demo reads "
                                                                      "(wav, flac, ogg or mp3)")
      raise ValueError(f"{REFUSED}: {name}: {why}. Upload another clip.") from None
    return audio, seconds

  def load_clip(self, path: str | None):
    """Handler of a new clip (upload, recording, or cleared): -> (clip state or None, spectrogram image or
    None, status text, chat messages []). A refused clip leaves no clip (the status says why)."""
    from musilingo_jax import generate as gen
    from musilingo_jax.data import audio as audio_lib
    if not path:
      return None, None, NO_CLIP, []
    try:
      audio, seconds = self.check_clip(path)
    except ValueError as e:
      return None, None, str(e), []
    features = gen.audio_features(self.model, audio, normalize=self.normalize_audio)
    heard = len(audio) / audio_lib.TARGET_SR
    part = (f"the first {heard:.1f} s of {_clock(seconds)}" if heard < seconds - 0.05
            else f"all {seconds:.1f} s")
    status = f"Listening to {os.path.basename(path)}: the model hears {part}. Ask about it."
    if not self.prompt_cfg.template:
      status += " (This model was trained to caption clips: it answers every message with a caption.)"
    clip = {"name": os.path.basename(path), "seconds": seconds, "heard": heard, "features": features,
            "history": []}
    return clip, spectrogram_image(audio, audio_lib.TARGET_SR), status, []

  # -- a question
  def stream_answer(self, clip: dict, question: str, *, greedy: bool, temperature: float, top_p: float,
                    max_new_tokens: int):
    """A generate.Stream answering `question` about `clip`, continuing its history (the Stream's result
    is the answer; the caller appends the turn to clip["history"])."""
    import numpy as np

    from musilingo_jax import generate as gen
    kw = dict(greedy=bool(greedy), temperature=float(temperature), top_p=float(top_p),
              max_new_tokens=int(max_new_tokens))
    if not self.prompt_cfg.template:  # stage-1: a caption, no question
      batch = gen.prompt_batch(self.tokenizer, [None], n_audio_tokens=clip["features"].shape[0],
                               prompt_cfg=self.prompt_cfg)
      batch["features"] = np.asarray(clip["features"])[None]
      run = lambda cb: gen.generate(self.model, batch, tokenizer=self.tokenizer,  # noqa: E731
                                    seed=self.sampling.seed, on_tokens=lambda rows: cb(rows[0]), **kw)[0]
      return gen.Stream(run, self.tokenizer)
    chat = gen.Chat(self.model, self.tokenizer, features=clip["features"], prompt_cfg=self.prompt_cfg,
                    seed=self.sampling.seed, prompt_bucket=self.prompt_bucket, **kw)
    chat.history = list(clip["history"])
    return chat.ask_stream(question)

  def ask(self, question: str, messages: list | None, clip: dict | None, temperature: float, top_p: float,
          max_new_tokens: float, greedy: bool):
    """Handler of a question (a generator): yields (chat messages, clip state, question box, status) as the
    answer grows; the question box empties at once. Without a clip, or with an empty question, the status
    says what to do and nothing is generated."""
    messages = list(messages or [])
    question = (question or "").strip()
    if clip is None:
      yield messages, clip, question, NO_CLIP
      return
    if not question:
      yield messages, clip, "", "Type a question about the clip first."
      return
    status = f"Answering about {clip['name']}..."
    messages = messages + [{"role": "user", "content": question}]
    answer = lambda text: messages + [{"role": "assistant", "content": text}]  # noqa: E731 - a new list each time
    yield answer(""), clip, "", status
    try:
      stream = self.stream_answer(clip, question, greedy=greedy, temperature=temperature, top_p=top_p,
                                  max_new_tokens=int(max_new_tokens))
      for text in stream:
        yield answer(text), clip, "", status
    except Exception as e:  # noqa: BLE001 - one failed answer must not take the page down
      why = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}"
      yield answer(f"(no answer: {why})"), clip, "", f"Generation failed: {why}"
      return
    result = stream.result
    clip = {**clip, "history": clip["history"] + [(question, result.text)]}
    status = (f"Listening to {clip['name']}. Answered in {len(result.token_ids)} tokens; ask a follow-up, or "
              "Reset to start over.")
    yield answer(result.text), clip, "", status

  def reset(self, clip: dict | None):
    """Handler of the reset button: -> (clip state without history, chat messages [], status)."""
    if clip is None:
      return None, [], NO_CLIP
    return {**clip, "history": []}, [], f"Listening to {clip['name']}. New chat: ask about it."


def build_app(model, tokenizer, prompt_cfg=None, *, limits: Limits = Limits(), sampling: Sampling = Sampling(),
              title: str = TITLE, normalize_audio: bool = False):
  """The Gradio Blocks page over `Demo(model, tokenizer, prompt_cfg)`; `launch` serves it. Element ids for
  tests: audio, spectrogram, status, chat, question, send, reset, greedy, temperature, top_p,
  max_new_tokens. No "share" buttons (they post to Hugging Face Spaces); analytics off. `app.demo` is the
  Demo."""
  os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
  import gradio as gr
  demo = Demo(model, tokenizer, prompt_cfg, limits=limits, sampling=sampling, normalize_audio=normalize_audio)
  heard = f"the first {limits.max_seconds:g} s" if limits.max_seconds > 0 else "all"
  with gr.Blocks(title=title, analytics_enabled=False) as app:
    gr.Markdown(f"## {title}: ask about a piece of music\nUpload or record a clip (up to "
                f"{_clock(limits.max_clip_seconds)}, {limits.max_upload_mb:g} MB; the model hears {heard} of "
                "it), then ask questions about it. Each answer continues the chat about the same clip.")
    clip = gr.State(None)
    with gr.Row():
      with gr.Column(scale=2):
        audio = gr.Audio(sources=["upload", "microphone"], type="filepath", label="Clip", elem_id="audio",
                         buttons=["download"])
        spectrogram = gr.Image(label="Spectrogram (what the model hears; mel scale)", interactive=False,
                               elem_id="spectrogram", buttons=["download", "fullscreen"])
        status = gr.Markdown(NO_CLIP, elem_id="status")
        with gr.Accordion("Sampling", open=True):
          greedy = gr.Checkbox(sampling.greedy, label="Greedy (argmax; ignores temperature and top-p)",
                               elem_id="greedy")
          temperature = gr.Slider(0.05, 2.0, value=sampling.temperature, step=0.05, label="Temperature",
                                  elem_id="temperature")
          top_p = gr.Slider(0.05, 1.0, value=sampling.top_p, step=0.05, label="Top-p", elem_id="top_p")
          max_new = gr.Slider(1, max(1024, sampling.max_new_tokens), value=sampling.max_new_tokens, step=1,
                              label="Max new tokens (each new value compiles the decoder once)",
                              elem_id="max_new_tokens")
      with gr.Column(scale=3):
        # Plain text: an answer such as "1998." is not a Markdown list. No "share": nothing leaves this server.
        chatbot = gr.Chatbot(label="Chat", elem_id="chat", height=460, feedback_options=None, render_markdown=False,
                             buttons=["copy", "copy_all"])
        question = gr.Textbox(label="Question", placeholder="What instrument is playing?", elem_id="question",
                              lines=1, max_lines=3)
        with gr.Row():
          send = gr.Button("Ask", variant="primary", elem_id="send")
          reset = gr.Button("Reset chat", elem_id="reset")

    def on_clip(path):
      out = demo.load_clip(path)
      if out[2].startswith(REFUSED):
        gr.Warning(out[2])  # a toast besides the status line
      return out

    audio.change(on_clip, [audio], [clip, spectrogram, status, chatbot], concurrency_id=_MODEL_QUEUE,
                 show_progress="minimal")
    ask_inputs = [question, chatbot, clip, temperature, top_p, max_new, greedy]
    ask_outputs = [chatbot, clip, question, status]
    question.submit(demo.ask, ask_inputs, ask_outputs, concurrency_id=_MODEL_QUEUE, show_progress="hidden")
    send.click(demo.ask, ask_inputs, ask_outputs, concurrency_id=_MODEL_QUEUE, show_progress="hidden")
    reset.click(demo.reset, [clip], [clip, chatbot, status])
    chatbot.clear(demo.reset, [clip], [clip, chatbot, status])  # the chat's own clear button: a reset too
  app.demo = demo
  return app


def launch(app, *, host: str = "127.0.0.1", port: int = 7860, max_upload_mb: float = Limits.max_upload_mb,
           prevent_thread_lock: bool = False, quiet: bool = False):
  """Serves `app` at http://host:port: never a public share link, uploads capped at max_upload_mb, no
  server-side rendering (no Node), the API page hidden. prevent_thread_lock: return at once (tests); else
  block until interrupted. Returns Gradio's (FastAPI app, local URL, share URL = None)."""
  return app.queue(default_concurrency_limit=1).launch(
      server_name=host, server_port=port, share=False, max_file_size=int(max_upload_mb * 1024 * 1024),
      prevent_thread_lock=prevent_thread_lock, quiet=quiet, ssr_mode=False, inbrowser=False, show_error=True,
      footer_links=[], pwa=False, mcp_server=False)


def main(argv=None) -> int:
  args = parse_args(argv)
  code = cli.check_storage(PROG, read=cli.model_source_reads(args))
  if code:
    return code
  os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
  from musilingo_jax import prompts
  model, tokenizer, config = cli.load_model(args, PROG, stream=sys.stderr)
  prompt_cfg = prompts.PromptConfig()
  if config is not None:
    from musilingo_jax.build import prompt_config
    prompt_cfg = prompt_config(config)
  limits = Limits(max_seconds=args.max_seconds, max_clip_seconds=args.max_clip_seconds,
                  max_upload_mb=args.max_upload_mb)
  sampling = Sampling(greedy=args.greedy, temperature=args.temperature, top_p=args.top_p,
                      max_new_tokens=args.max_new_tokens, seed=args.seed)
  app = build_app(model, tokenizer, prompt_cfg, limits=limits, sampling=sampling,
                  normalize_audio=cli.audio_normalize(args, config))
  print(f"{PROG}: http://{args.host}:{args.port} (Ctrl-C stops it)", file=sys.stderr, flush=True)
  try:
    launch(app, host=args.host, port=args.port, max_upload_mb=args.max_upload_mb)
  except OSError as e:  # the port is taken, the address is not this machine's
    print(f"{PROG}: error: --host {args.host} --port {args.port}: {e}", file=sys.stderr, flush=True)
    return 2
  except KeyboardInterrupt:
    pass
  return 0


def run() -> None:
  """Console-script entry point (musilingo-serve)."""
  sys.exit(main())


if __name__ == "__main__":
  run()
