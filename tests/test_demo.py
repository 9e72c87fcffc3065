"""The web demo: the answer's coloured spans, and the page driven in a headless Chromium."""

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from prima_jax import demo, predict
from prima_jax.evaluation.rle import decode_rle
from prima_jax.inference.grounding import Prediction, SegPrediction, SegToken

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import browser  # noqa: E402


def _prediction(answer, segs, dropped):
  sizes = [(4, 4)] * 3
  return Prediction(answer=answer, segs=[SegPrediction(phrase, k, np.ones((4, 4), bool), 0.9, t)
                                         for phrase, k, t in segs],
                    dropped=[SegToken(t, phrase, None, reason) for phrase, t, reason in dropped],
                    token_ids=[], finished=True, num_images=3, image_sizes=sizes)


def test_answer_spans_colour_each_grounded_phrase_like_its_mask():
  answer = ("The <p> red ball </p> [SEG] (IMAGE2) left of <p> a cube </p> [SEG] and <p> the box </p> "
            "[SEG] (IMAGE1) ; <p> loose </p> end")
  pred = _prediction(answer, segs=[("red ball", 1, 3), ("the box", 0, 14)],
                     dropped=[("a cube", 8, "missing_tag")])
  spans, colours = demo.answer_spans(pred)
  assert spans == [("The ", None), ("red ball", "1: IMAGE2"), (" left of ", None),
                   ("a cube", "no mask: missing_tag"), (" and ", None), ("the box", "2: IMAGE1"),
                   (" ; ", None), (" loose ", None), (" end", None)]
  # The overlays draw mask j in PALETTE[j]: the same colours, in hex.
  hexes = ["#" + "".join(f"{int(c):02x}" for c in predict.PALETTE[j]) for j in range(2)]
  assert colours == {"1: IMAGE2": hexes[0], "2: IMAGE1": hexes[1],
                     "no mask: missing_tag": demo.DROPPED_COLOUR}
  assert demo.image_caption(pred, 0, "a.png") == "IMAGE1 · a.png · masks 2"
  assert demo.image_caption(pred, 2, "c.png") == "IMAGE3 · c.png · no mask"


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _wait_for_server(proc, port: int, timeout_s: float = 600) -> None:
  deadline = time.time() + timeout_s
  while time.time() < deadline:
    if proc.poll() is not None:
      raise AssertionError(f"the demo exited with {proc.returncode}:\n{proc.stdout.read()[-3000:]}")
    with socket.socket() as s:
      if s.connect_ex(("127.0.0.1", port)) == 0:
        return
    time.sleep(1)
  raise AssertionError(f"the demo did not serve on port {port} within {timeout_s} s")


def test_web_demo_in_a_browser(tmp_path):
  rng = np.random.default_rng(7)
  sizes = {1: (48, 40), 2: (30, 56)}
  images = []
  for k, (h, w) in sizes.items():
    path = tmp_path / f"upload{k}.png"
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    images.append(str(path))
  port = _free_port()
  env = dict(os.environ, JAX_PLATFORMS="cpu", TMPDIR=str(tmp_path))
  proc = subprocess.Popen([sys.executable, "-m", "prima_jax.demo", "--config=configs/demo.py:test",
                           f"--port={port}", "--max_new_tokens=32"], cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  try:
    _wait_for_server(proc, port)
    # The seeded random model writes nonsense; the forced start grounds two phrases (as a user can
    # with the page's "Start the answer with" field), so masks, colours and overlays are all exercised.
    shot = tmp_path / "web_demo.png"
    forced = "The <p> red circle </p> [SEG] (IMAGE2) and <p> cube </p> [SEG] (IMAGE1)"
    seen = browser.ask(f"http://127.0.0.1:{port}", images, "Which shapes are red?", answer_prefix=forced,
                       screenshot=str(shot), timeout_s=600)
  finally:
    proc.terminate()
    output = proc.communicate(timeout=60)[0]
  assert proc.returncode == 0, output[-3000:]
  # Every scratch directory of the answers is gone with the server.
  assert not [p for p in os.listdir(tmp_path) if p.startswith("prima-demo-")]
  assert "red circle" in seen["answer"] and "cube" in seen["answer"]
  assert "2 mask(s)" in seen["status"], seen["status"]
  # The grounded phrases are highlighted in their masks' colours (PALETTE[j] for mask j), in answer order.
  css = ["rgb({}, {}, {})".format(*(int(c) for c in predict.PALETTE[j])) for j in range(2)]
  assert seen["highlighted"] == [("red circle", "1: IMAGE2", css[0]), ("cube", "2: IMAGE1", css[1])], seen
  # One overlay per image, decoded by the browser at the size predict draws it.
  assert seen["overlays"] == [(w * predict.overlay_scale(h, w), h * predict.overlay_scale(h, w))
                              for h, w in sizes.values()]
  assert shot.stat().st_size > 10_000
  assert seen["download_name"] == "prediction.json"
  record = json.loads(seen["download_text"])
  assert [s["image"] for s in record["segs"][:2]] == [2, 1]
  for s in record["segs"]:
    assert decode_rle(s["mask"]).shape == sizes[s["image"]]


@pytest.mark.parametrize("args,message", [([], "--checkpoint=WORKDIR"),
                                          (["--checkpoint=/nonexistent/run"], "/nonexistent/run")])
def test_demo_refuses_a_missing_model_in_one_line(args, message):
  proc = subprocess.run([sys.executable, "-m", "prima_jax.demo", *args], cwd=ROOT, capture_output=True,
                        text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=300)
  assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr
