"""musilingo-serve, the web demo (musilingo_jax/main/serve.py).

Handlers without a browser: a demo clip (a music21 chorale rendered as the demo set renders it) is encoded
once as musilingo-generate encodes it, the streamed answer is generate.Chat's (greedy: the same ids), a
follow-up continues the chat, reset and a new clip start over; a file that is not audio, an empty file, a
clip under a second and one over the length cap are refused with a message and no model call; the program's
flags and its one-line errors. Streaming itself: the text pieces join to the answer.

End to end in a real headless browser (Debian's chromium through its chromedriver, Selenium): the app served
on 127.0.0.1, a clip uploaded, a question typed, the streamed answer read from the page and compared with
generate.Chat's, a follow-up; then a non-audio file, a too-long clip, an empty file and an over-size upload
each give their message on the page, and the same server still answers; a recording from chromium's fake
microphone is answered too; the page fetched nothing from outside 127.0.0.1. A screenshot is saved under
$MUSILINGO_TEST_ARTEFACTS (else the test's tmp folder), and to docs/serve.png with
MUSILINGO_UPDATE_SCREENSHOT=1. MUSILINGO_SERVE_WORKDIR=RUN runs every test on a trained run (e.g. the
demo's) instead of the tiny random model: the README's screenshot comes from the demo's run.
"""

import json
import os
import shutil
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

import tiny_hf
from musilingo_jax import build, generate as gen
from musilingo_jax.data import demo as demo_data, render
from musilingo_jax.main import generate as generate_main, serve

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
SAMPLING = serve.Sampling(greedy=True, max_new_tokens=12)
LIMITS = serve.Limits(max_seconds=30.0, max_clip_seconds=20.0, max_upload_mb=1.0)
QUESTIONS = ("What instrument is playing?", "And how fast is it?")
CLIP_SECONDS = 10.0


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
  """(model, tokenizer, prompt config): a tiny converted MERT + LLaMA with a random projection (float32), or
  the run MUSILINGO_SERVE_WORKDIR names."""
  from musilingo_jax import prompts
  workdir = os.environ.get("MUSILINGO_SERVE_WORKDIR")
  if workdir:
    model, tok, config = build.load_for_inference(workdir=workdir)
    return model, tok, build.prompt_config(config)
  root = tiny_hf.converted_tiny_models(tmp_path_factory.mktemp("serve-model"))
  model, tok, _ = build.load_for_inference(checkpoint=str(root / "converted"), projection=str(root / "proj.npz"),
                                           dtype="float32")
  return model, tok, prompts.PromptConfig()


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, Path]:
  """A demo clip (the opening of Bach's BWV 66.6 on the demo's numpy piano, 10 s at 24 kHz, as the demo set
  writes it) and the bad uploads: text named .wav, an empty .wav, half a second, 25 s (over LIMITS' 20 s cap)
  and 1.5 MB of noise (over LIMITS' 1 MB upload cap)."""
  d = tmp_path_factory.mktemp("serve-clips")
  piece = demo_data.extract_piece("bach/bwv66.6.mxl")
  notes = demo_data.clip_notes(piece, bpm=100, transpose=0, clip_seconds=CLIP_SECONDS)
  audio = render.render(notes, bpm=100, instrument="piano", n_samples=int(CLIP_SECONDS * render.SAMPLE_RATE),
                        renderer="numpy")
  render.write_wav(d / "bach_bwv66.6_piano.wav", audio)
  (d / "notes.wav").write_text("these are my notes about the piece, not audio\n")
  (d / "empty.wav").write_bytes(b"")
  rng = np.random.default_rng(0)
  sf.write(d / "blip.wav", (0.1 * rng.standard_normal(4000)).astype(np.float32), 8000, subtype="PCM_16")
  sf.write(d / "long.wav", (0.1 * rng.standard_normal(25 * 8000)).astype(np.float32), 8000, subtype="PCM_16")
  sf.write(d / "big.wav", (0.1 * rng.standard_normal(750_000)).astype(np.float32), 24000, subtype="PCM_16")
  assert (d / "big.wav").stat().st_size > LIMITS.max_upload_mb * 1024 * 1024
  return {"good": d / "bach_bwv66.6_piano.wav", "not_audio": d / "notes.wav", "empty": d / "empty.wav",
          "short": d / "blip.wav", "too_long": d / "long.wav", "too_large": d / "big.wav"}


@pytest.fixture(scope="module")
def expected(loaded, clips) -> list[gen.GenerationResult]:
  """What musilingo-generate --chat answers to QUESTIONS about the good clip (greedy, SAMPLING's budget)."""
  model, tok, prompt_cfg = loaded
  features = gen.audio_features(model, generate_main.load_audio(str(clips["good"]), LIMITS.max_seconds))
  kw = dict(features=features, prompt_cfg=prompt_cfg, greedy=True, max_new_tokens=SAMPLING.max_new_tokens,
            temperature=SAMPLING.temperature, top_p=SAMPLING.top_p)
  chat = gen.Chat(model, tok, prompt_bucket=serve.PROMPT_BUCKET, **kw)
  answers = [chat.ask(q) for q in QUESTIONS]
  assert answers[0].text, "the model's first answer is empty: pick another question"
  unpadded = gen.Chat(model, tok, **kw)  # the buckets' left padding does not change the answers
  assert [unpadded.ask(q).token_ids for q in QUESTIONS] == [a.token_ids for a in answers]
  return answers


@pytest.fixture(scope="module")
def demo(loaded) -> serve.Demo:
  return serve.Demo(*loaded, limits=LIMITS, sampling=SAMPLING)


def _ask(demo, question, messages, clip):
  """Runs the question handler to the end -> (every yield, last yield)."""
  outs = list(demo.ask(question, messages, clip, SAMPLING.temperature, SAMPLING.top_p, SAMPLING.max_new_tokens,
                       SAMPLING.greedy))
  return outs, outs[-1]


# ---- the handlers, without a browser -------------------------------------------------------------------

def test_clip_is_encoded_once_and_answers_are_the_chats(demo, loaded, clips, expected):
  model = loaded[0]
  clip, image, status, messages = demo.load_clip(str(clips["good"]))
  assert status.startswith(f"Listening to {clips['good'].name}: the model hears all 10.0 s") and messages == []
  want = gen.audio_features(model, generate_main.load_audio(str(clips["good"]), LIMITS.max_seconds))
  np.testing.assert_array_equal(clip["features"], want)  # the CLI's features
  assert image.dtype == np.uint8 and image.shape == (200, 800, 3) and image.std() > 10

  outs, (messages, clip, box, status) = _ask(demo, QUESTIONS[0], [], clip)
  assert box == "" and outs[0][0][-1] == {"role": "assistant", "content": ""}  # the box empties at once
  assert messages == [{"role": "user", "content": QUESTIONS[0]}, {"role": "assistant", "content": expected[0].text}]
  shown = [o[0][-1]["content"] for o in outs[1:]]
  assert len(shown) > 2 and shown[-1] == expected[0].text  # streamed: several partial answers, then the answer
  assert clip["history"] == [(QUESTIONS[0], expected[0].text)] and "Answered in" in status

  _, (messages, clip, _, _) = _ask(demo, QUESTIONS[1], messages, clip)  # a follow-up continues the chat
  assert [m["content"] for m in messages[1::2]] == [a.text for a in expected]
  assert [q for q, _ in clip["history"]] == list(QUESTIONS)

  clip, messages, status = demo.reset(clip)
  assert clip["history"] == [] and messages == [] and "New chat" in status
  _, (messages, _, _, _) = _ask(demo, QUESTIONS[0], messages, clip)  # after a reset: turn one again
  assert messages[-1]["content"] == expected[0].text


@pytest.mark.parametrize("kind,says", [
    ("not_audio", "notes.wav: it is not an audio file this demo reads"),
    ("empty", "empty.wav: the file is empty"),
    ("short", "blip.wav: it is shorter than a second"),
    ("too_long", "long.wav is 0:25 long; this demo takes clips up to 0:20 (20 s)"),
])
def test_bad_clip_is_refused_with_a_message(demo, clips, kind, says, monkeypatch):
  monkeypatch.setattr(gen, "audio_features", lambda *a: pytest.fail("the model ran on a refused clip"))
  clip, image, status, messages = demo.load_clip(str(clips[kind]))
  assert clip is None and image is None and messages == []
  assert status.startswith(f"{serve.REFUSED}: ") and says in status, status
  outs, (messages, clip, _, status) = _ask(demo, "What is it?", [], clip)  # no clip: nothing is generated
  assert len(outs) == 1 and messages == [] and status == serve.NO_CLIP


def test_too_long_is_refused_before_decoding(demo, clips, monkeypatch):
  from musilingo_jax.data import audio as audio_lib
  monkeypatch.setattr(audio_lib, "read_audio", lambda *a: pytest.fail("a too-long clip was decoded"))
  assert "is 0:25 long" in demo.load_clip(str(clips["too_long"]))[2]


def test_only_the_first_max_seconds_are_heard(loaded, tmp_path):
  x = (0.1 * np.random.default_rng(1).standard_normal(8000 * 12)).astype(np.float32)
  sf.write(tmp_path / "twelve.wav", x, 8000, subtype="PCM_16")
  short = serve.Demo(*loaded, limits=serve.Limits(max_seconds=5.0, max_clip_seconds=20.0))
  clip, _, status, _ = short.load_clip(str(tmp_path / "twelve.wav"))
  assert "the model hears the first 5.0 s of 0:12" in status and clip["heard"] == 5.0
  want = gen.audio_features(loaded[0], generate_main.load_audio(str(tmp_path / "twelve.wav"), 5.0))
  np.testing.assert_array_equal(clip["features"], want)


def test_streamed_pieces_join_to_the_answer(loaded, demo, clips, expected):
  model, tok, prompt_cfg = loaded
  clip = demo.load_clip(str(clips["good"]))[0]
  chat = gen.Chat(model, tok, features=clip["features"], prompt_cfg=prompt_cfg, greedy=True,
                  max_new_tokens=SAMPLING.max_new_tokens, prompt_bucket=serve.PROMPT_BUCKET)
  stream = chat.ask_stream(QUESTIONS[0])
  pieces = list(stream.pieces())
  assert len(pieces) > 2 and "".join(pieces) == expected[0].text
  assert stream.result.token_ids == expected[0].token_ids and chat.history == [(QUESTIONS[0], expected[0].text)]


def test_spectrogram_puts_low_frequencies_at_the_bottom():
  t = np.arange(24000 * 2) / 24000
  low = serve.spectrogram_image(np.sin(2 * np.pi * 200 * t), 24000, width=100, height=64)
  high = serve.spectrogram_image(np.sin(2 * np.pi * 8000 * t), 24000, width=100, height=64)
  assert low.shape == high.shape == (64, 100, 3) and low.dtype == np.uint8
  brightest = lambda img: int(img.sum(-1).mean(1).argmax())  # noqa: E731 - row index, 0 = top
  assert brightest(low) > 48 and brightest(high) < 24
  assert serve.spectrogram_image(np.zeros(10), 24000).shape == (200, 800, 3)  # shorter than one frame


def test_flags_and_one_line_errors(tmp_path, capsys):
  args = serve.parse_args(["--checkpoint", "ckpt"])
  assert (args.host, args.port, args.max_seconds, args.max_clip_seconds) == ("127.0.0.1", 7860, 30.0, 600.0)
  assert (args.temperature, args.top_p, args.max_new_tokens, args.greedy) == (0.1, 0.5, 300, False)
  for bad in (["--workdir", "run", "--projection", "p.npz"], ["--checkpoint", "c", "--port", "0"],
              ["--checkpoint", "c", "--max-clip-seconds", "0"]):
    with pytest.raises(SystemExit) as e:
      serve.parse_args(bad)
    assert e.value.code == 2
  capsys.readouterr()
  assert serve.main(["--workdir", str(tmp_path / "nope")]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith(f"serve: error: --workdir {tmp_path / 'nope'}"), err


def test_wrapper_and_console_script():
  assert "from musilingo_jax.main.serve import run" in (ROOT / "scripts" / "serve.py").read_text()
  assert 'musilingo-serve = "musilingo_jax.main.serve:run"' in (ROOT / "pyproject.toml").read_text()


# ---- end to end, in a real browser ----------------------------------------------------------------------

def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _wait(what: str, fn, timeout: float = 60.0):
  """fn()'s first truthy value within `timeout` seconds (elements re-rendered under us count as not yet)."""
  from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
  end = time.monotonic() + timeout
  last = None
  while time.monotonic() < end:
    try:
      last = fn()
      if last:
        return last
    except (NoSuchElementException, StaleElementReferenceException):
      pass
    time.sleep(0.1)
  raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r})")


@pytest.fixture(scope="module")
def browser():
  """Headless Debian chromium through its chromedriver (skipped when either is missing)."""
  webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")
  from selenium.webdriver.chrome.service import Service
  missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
  if missing:
    pytest.skip(f"{' and '.join(missing)} missing: apt-get install -y chromium chromium-driver")
  options = webdriver.ChromeOptions()
  options.binary_location = CHROMIUM
  for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
              "--window-size=1400,1000", "--disable-extensions", "--no-first-run",
              "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream"):  # a microphone that beeps
    options.add_argument(arg)
  options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
  driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
  yield driver
  driver.quit()


@pytest.fixture(scope="module")
def served(loaded):
  """The app on 127.0.0.1 at a free port, in this process (a server thread) -> its URL."""
  app = serve.build_app(*loaded, limits=LIMITS, sampling=SAMPLING)
  _, url, share_url = serve.launch(app, port=_free_port(), max_upload_mb=LIMITS.max_upload_mb,
                                   prevent_thread_lock=True, quiet=True)
  assert share_url is None and app.share is False and app.server_name == "127.0.0.1"
  assert app.max_file_size == int(LIMITS.max_upload_mb * 1024 * 1024) and app.analytics_enabled is False
  yield url
  app.close()


def _artefacts(tmp_path) -> Path:
  folder = Path(os.environ.get("MUSILINGO_TEST_ARTEFACTS") or tmp_path)
  folder.mkdir(parents=True, exist_ok=True)
  return folder


def test_browser_upload_ask_and_bad_uploads(browser, served, clips, expected, tmp_path):
  from selenium.webdriver.common.by import By
  d = browser
  status = lambda: d.find_element(By.ID, "status").text  # noqa: E731
  answers = lambda: [e.text for e in d.find_elements(By.CSS_SELECTOR, "#chat [data-testid='bot']")]  # noqa: E731

  def upload(kind):
    clear = d.find_elements(By.CSS_SELECTOR, "#audio button[aria-label='Clear']")
    if clear:  # a clip (or an error) is shown: clear it first, as a user would
      d.execute_script("arguments[0].click()", clear[0])
      _wait("the cleared clip", lambda: status() == serve.NO_CLIP)
    d.find_element(By.CSS_SELECTOR, "#audio input[type=file]").send_keys(str(clips[kind]))

  def ask(question, n_answers):
    box = d.find_element(By.CSS_SELECTOR, "#question textarea")
    box.send_keys(question)
    d.find_element(By.ID, "send").click()
    _wait(f"answer {n_answers}", lambda: "Answered in" in status() and len(answers()) == n_answers
          and answers()[-1], timeout=120)
    return answers()

  d.get(served)
  _wait("the page", lambda: status() == serve.NO_CLIP)
  assert d.title == serve.TITLE

  upload("good")
  _wait("the clip", lambda: status().startswith("Listening to bach_bwv66.6_piano.wav"))
  assert d.find_element(By.CSS_SELECTOR, "#spectrogram img").get_attribute("src")
  assert ask(QUESTIONS[0], 1) == [expected[0].text]
  assert ask(QUESTIONS[1], 2) == [a.text for a in expected]  # the follow-up continues the chat
  shot = _artefacts(tmp_path) / "serve.png"
  d.save_screenshot(str(shot))
  print(f"screenshot: {shot}")
  if os.environ.get("MUSILINGO_UPDATE_SCREENSHOT") == "1":
    shutil.copyfile(shot, ROOT / "docs" / "serve.png")

  for kind, says in (("not_audio", "notes.wav: it is not an audio file"), ("too_long", "long.wav is 0:25 long"),
                     ("empty", "empty.wav: the file is empty")):
    upload(kind)
    _wait(f"the message for the {kind} upload", lambda: status().startswith(serve.REFUSED))
    assert says in status() and answers() == []  # the page says why; the old chat is gone
  upload("too_large")  # Gradio refuses it (413) and says so in a toast
  _wait("the over-size message", lambda: any("exceed the maximum allowed size" in e.text
                                             for e in d.find_elements(By.CSS_SELECTOR, ".toast-body")))

  upload("good")  # the same server still answers
  _wait("the clip again", lambda: status().startswith("Listening to bach_bwv66.6_piano.wav"))
  assert ask(QUESTIONS[0], 1) == [expected[0].text]

  # A recording from the (fake) microphone is a clip too.
  d.execute_script("arguments[0].click()", d.find_element(By.CSS_SELECTOR, "#audio button[aria-label='Clear']"))
  _wait("the cleared clip", lambda: status() == serve.NO_CLIP)
  d.find_element(By.CSS_SELECTOR, "#audio button[aria-label='Record audio']").click()
  button = lambda text: _wait(f"the {text} button", lambda: [  # noqa: E731
      b for b in d.find_elements(By.CSS_SELECTOR, "#audio button") if b.text.strip() == text])[0]
  button("Record").click()
  time.sleep(2)
  button("Stop").click()
  _wait("the recording", lambda: status().startswith("Listening to ") and "the model hears all" in status())
  ask(QUESTIONS[0], 1)

  outside = set()
  for entry in d.get_log("performance"):
    message = json.loads(entry["message"])["message"]
    if message["method"] == "Network.requestWillBeSent":
      url = message["params"]["request"]["url"]
      if url.startswith(("http:", "https:", "ws:", "wss:")) and not url.startswith(served.rstrip("/")):
        outside.add(url)
  assert not outside, f"the page fetched from outside the server: {sorted(outside)}"
