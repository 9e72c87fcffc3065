r"""A web demo: upload images, ask, see the answer with each grounded phrase coloured like its mask.

  python -m prima_jax.demo --checkpoint=/tmp/prima_demo [--port=7860] [--host=127.0.0.1]
  python -m prima_jax.demo --config=configs/demo.py        # a seeded random model (nothing trained)

Serves a gradio page (needs the ``demo`` extra: ``pip install -e ".[demo]"``): 1 to
``prima.max_images`` images (IMAGE1, IMAGE2, ... in upload order), a question, and the answer with
each ``<p> phrase </p> [SEG] (IMAGEk)`` drawn as the phrase in its mask's colour, one overlay per
image (the same drawing as ``python -m prima_jax.predict``) and the ``prediction.json`` to download
(the same record, masks as COCO RLE). The model is loaded and checked once at start-up, before the
server starts; the first question compiles the model (seconds to a minute), later ones reuse it.
Questions are answered one at a time.

Nothing is sent anywhere: gradio's analytics are off and no share link is made; the page is served on
``--host`` (default localhost only).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import tempfile
import threading
from collections.abc import Sequence

from absl import flags

from prima_jax import cli, paths, predict

# The answer's colouring and captions are predict's (its index page draws them the same way).
from prima_jax.predict import (  # noqa: F401
  DROPPED_COLOUR,
  answer_spans,
  hex_colour,
  image_caption,
  seg_colour,
)


class Demo:
  """Answers the page's questions with one :class:`prima_jax.predict.Session`.

  Each answer is written to its own directory under ``scratch`` by :func:`prima_jax.predict.write_outputs`
  (the overlays and ``prediction.json`` of the command-line tool), which the page shows and offers.
  """

  def __init__(self, session: predict.Session, scratch: str):
    self.session = session
    self.scratch = scratch
    self._lock = threading.Lock()

  def answer(self, image_files: Sequence[str], question: str, answer_prefix: str = ""):
    """(spans, colours, [(overlay path, caption)], prediction.json path, status line) for the page.

    ``answer_prefix``: text the answer is forced to start with (e.g. ``<p> the red ball </p> [SEG]
    (IMAGE2)`` to segment a phrase of your own); generation continues after it. Raises InputError (no
    image, too many, an unreadable file, an empty question).
    """
    image_files = [str(f) for f in image_files or []]
    predict.check_request(question, len(image_files), self.session.max_images)
    images = [predict.read_image(f) for f in image_files]
    names = [os.path.basename(f) for f in image_files]
    with self._lock:
      prediction, meta = self.session.answer(images, question, answer_prefix=answer_prefix.strip() or None)
    out = tempfile.mkdtemp(prefix="answer-", dir=self.scratch)
    predict.write_outputs(out, prediction, images, names, question, meta)
    spans, colours = answer_spans(prediction)
    gallery = [(os.path.join(out, predict.overlay_name(k)), image_caption(prediction, k, names[k]))
               for k in range(len(images))]
    status = (f"{len(prediction.segs)} mask(s), {len(prediction.dropped)} [SEG] without mask; "
              f"{meta['seconds']:.2f} s" + ("" if prediction.finished else "; stopped at the token budget"))
    return spans, colours, gallery, os.path.join(out, predict.PREDICTION_FILE), status

  def build(self):
    """The gradio Blocks app (elements have stable ``elem_id``s: images, question, ask, answer,
    overlays, download, status)."""
    import gradio as gr  # noqa: PLC0415 (the demo extra)

    from prima_jax.inference.engine import InputError  # noqa: PLC0415

    opened = self.session.opened
    source = (f"checkpoint `{opened.checkpoint}` (step {self.session.loaded.step})" if opened.checkpoint
              else "a seeded random model (no checkpoint)")
    with gr.Blocks(title="PRIMA") as app:
      gr.Markdown(f"## PRIMA: multi-image pixel-grounded reasoning\nModel: {source}. Upload 1 to "
                  f"{self.session.max_images} images (IMAGE1, IMAGE2, … in upload order) and ask about them.")
      with gr.Row():
        with gr.Column(scale=1):
          files = gr.File(label="Images", file_count="multiple", file_types=["image"], elem_id="images")
          question = gr.Textbox(label="Question", lines=2, elem_id="question")
          with gr.Accordion("Start the answer with (optional)", open=False):
            prefix = gr.Textbox(show_label=False, lines=1, elem_id="answer_prefix",
                                placeholder="<p> the red ball </p> [SEG] (IMAGE2)")
          ask = gr.Button("Ask", variant="primary", elem_id="ask")
          status = gr.Markdown(elem_id="status")
        with gr.Column(scale=2):
          answer = gr.HighlightedText(label="Answer (grounded phrases in their masks' colours)",
                                      combine_adjacent=False, show_legend=False, elem_id="answer")
          overlays = gr.Gallery(label="Masks per image", columns=3, object_fit="contain", elem_id="overlays")
          download = gr.File(label="prediction.json", elem_id="download")

      def on_ask(image_files, text, answer_prefix):
        try:
          spans, colours, gallery, record, line = self.answer(image_files, text, answer_prefix or "")
        except (InputError, paths.PathError, OSError) as e:
          raise gr.Error(str(e)) from None
        return gr.HighlightedText(value=spans, color_map=colours), gallery, record, line

      inputs, outputs = [files, question, prefix], [answer, overlays, download, status]
      ask.click(on_ask, inputs, outputs)
      question.submit(on_ask, inputs, outputs)
    return app


def main(argv) -> int:
  del argv
  os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
  # gradio's HTTP client logs every request it makes to its own server at INFO.
  logging.getLogger("httpx").setLevel(logging.WARNING)
  from prima_jax.inference.engine import InputError  # noqa: PLC0415
  from prima_jax.inference.loading import open_run  # noqa: PLC0415
  from prima_jax.workdir import IncompatibleCheckpoint, NotAWorkdir  # noqa: PLC0415
  try:
    import gradio  # noqa: F401, PLC0415
  except ImportError:
    print('error: the web demo needs gradio: pip install -e ".[demo]"', file=sys.stderr)
    return 2
  if _CONFIG.value is None and _CHECKPOINT.value is None:
    print("error: give --checkpoint=WORKDIR (a trained run) or --config=FILE (a seeded random model)",
          file=sys.stderr)
    return 2
  try:
    session = predict.Session(open_run(_CONFIG.value, _CHECKPOINT.value), data_dir=_DATA_DIR.value,
                              max_new_tokens=_MAX_NEW_TOKENS.value)
  except (paths.PathError, NotAWorkdir, IncompatibleCheckpoint, InputError, OSError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    return 2
  # SIGTERM ends the server like Ctrl-C does, so the answers' scratch directory is removed.
  signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
  with tempfile.TemporaryDirectory(prefix="prima-demo-") as scratch:
    app = Demo(session, scratch).build()
    print(f"serving the PRIMA demo on http://{_HOST.value}:{_PORT.value} (Ctrl-C stops it)", flush=True)
    app.launch(server_name=_HOST.value, server_port=_PORT.value, share=False, quiet=True,
               show_error=True, allowed_paths=[scratch])
  return 0


if __name__ == "__main__":
  _CONFIG, _CHECKPOINT = cli.define_run_flags()
  _DATA_DIR = flags.DEFINE_string("data_dir", None, "Directory holding tokenizers/ (default: the run data).")
  _MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 128, "Generation budget in tokens.")
  _HOST = flags.DEFINE_string("host", "127.0.0.1", "Address to serve on (0.0.0.0: every interface).")
  _PORT = flags.DEFINE_integer("port", 7860, "Port to serve on.")
  cli.run(main)
