r"""Answer a question about 1..max_images images with grounded masks.

  python -m prima_jax.predict --checkpoint=/tmp/prima_demo \
      --image=a.png --image=b.png --question="Which shapes are red?" --out=/tmp/pred

``--checkpoint`` is a training workdir (or its ``checkpoints`` dir, or one step dir): the model config
comes from the run's record. ``--config`` alone runs the config's seeded (random) initialisation.
Prints the answer and the masks; writes ``OUT/prediction.json`` and ``OUT/image{k}_overlay.png``
(k = 1-based image index, the ``(IMAGEk)`` of the answer) with every mask of that image drawn in its
own colour and labelled with its phrase. Each file is written whole (atomically), ``prediction.json``
last: a directory without it holds no complete result. An ``--out`` holding a previous prediction is
refused unless ``--overwrite``; then the previous run's files that this one does not write (the
overlays of images it does not have) are removed, so no stale file is left beside the new result.
Other files in ``--out`` are left alone.

``--checkpoint``, ``--image`` and ``--out`` may be local paths or object-store URLs (``gs://...``);
they are checked before the model is built: a bad one exits with status 2 and one ``error:`` line.
"""

from __future__ import annotations

import io
import json
import os
import re
import sys
import time
from collections.abc import Sequence

import numpy as np
from absl import flags
from PIL import Image, ImageDraw

from prima_jax import cli, paths

# Distinct overlay colours (RGB), cycled.
PALETTE = np.asarray([(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180),
                      (70, 240, 240), (240, 50, 230), (210, 245, 60), (0, 128, 128), (170, 110, 40)],
                     np.float32)


def read_image(path: str | os.PathLike) -> np.ndarray:
  """uint8 [H, W, 3] RGB of a local or object-store image, decoded as the dataset builder does
  (``prima_jax.data.images``: EXIF orientation, every mode to 8-bit RGB, the pixel limit);
  InputError naming the path when it cannot be read or decoded (paths.PathError for an unusable URL)."""
  from prima_jax.data import images  # noqa: PLC0415
  from prima_jax.inference.engine import InputError  # noqa: PLC0415

  resolved = paths.resolve(path, what="--image")
  try:
    data = resolved.read_bytes()
  except OSError as e:
    raise InputError(f"cannot read image {path}: {e.strerror or e}") from None
  try:
    return images.decode(data, str(path))
  except images.ImageError as e:
    raise InputError(f"cannot read image {e}") from None


# Overlays of smaller images are enlarged (nearest neighbour, integer factor) so their labels stay legible.
MIN_OVERLAY_SIDE = 256


def overlay_scale(height: int, width: int) -> int:
  """Integer enlargement factor of an overlay: the shorter side reaches at least MIN_OVERLAY_SIDE."""
  return max(1, -(-MIN_OVERLAY_SIDE // min(height, width)))


def draw_overlay(image: np.ndarray, masks: Sequence[np.ndarray], labels: Sequence[str],
                 colours: Sequence[np.ndarray]) -> Image.Image:
  """The image with each mask blended in its colour and its label written at the mask's centre.

  Images with a side under MIN_OVERLAY_SIDE pixels are drawn enlarged by :func:`overlay_scale`.
  """
  from prima_jax.training.visualize import overlay  # noqa: PLC0415
  scale = overlay_scale(*image.shape[:2])
  enlarge = lambda x: np.repeat(np.repeat(x, scale, axis=0), scale, axis=1)  # noqa: E731
  image, masks = enlarge(image), [enlarge(m) for m in masks]
  out = image
  for mask, colour in zip(masks, colours):
    out = overlay(out, mask, colour)
  pil = Image.fromarray(out)
  draw = ImageDraw.Draw(pil)
  for mask, label, colour in zip(masks, labels, colours):
    ys, xs = np.nonzero(mask)
    if len(ys):
      draw.text((float(xs.mean()), float(ys.mean())), label, fill=tuple(int(c) for c in colour),
                stroke_width=1, stroke_fill=(0, 0, 0))
  return pil


PREDICTION_FILE = "prediction.json"


def overlay_name(k: int) -> str:
  """The overlay file of image k (0-based)."""
  return f"image{k + 1}_overlay.png"


_OUTPUT_FILE = re.compile(r"^(?:prediction\.json|image[0-9]+_overlay\.png)$")


def previous_outputs(out_dir: str | os.PathLike) -> list[str]:
  """The names of the files in ``out_dir`` that a prediction writes (sorted; empty when none).

  Raises:
    paths.PathError: ``out_dir`` is a file.
  """
  out = paths.resolve(out_dir, what="--out")
  if not out.exists():
    return []
  if not out.is_dir():
    raise paths.PathError(f"--out={out_dir} is a file, not a directory")
  return sorted(p.name for p in out.iterdir() if _OUTPUT_FILE.match(p.name))


def check_out(out_dir: str | os.PathLike, *, overwrite: bool) -> None:
  """FileExistsError when ``out_dir`` holds a previous prediction and ``overwrite`` is False."""
  found = previous_outputs(out_dir)
  if found and not overwrite:
    raise FileExistsError(f"--out={out_dir} holds a previous prediction ({', '.join(found)}); pass "
                          "--overwrite to replace it")


def write_outputs(out_dir: str | os.PathLike, prediction, images: Sequence[np.ndarray],
                  image_paths: Sequence[str], question: str, meta: dict) -> dict:
  """Writes one overlay PNG per image, removes a previous run's files that this one does not write,
  then writes prediction.json (each file atomically, local or object store); returns the JSON dict."""
  out = paths.resolve(out_dir, what="--out")
  record = dict(question=question, images=list(image_paths), image_index_base=1, **prediction.to_json(),
                **meta)
  pngs = {}
  for k, image in enumerate(images):
    segs = [(j, s) for j, s in enumerate(prediction.segs) if s.image_index == k]
    pil = draw_overlay(image, [s.mask for _, s in segs], [f"{j + 1}: {s.phrase}" for j, s in segs],
                       [PALETTE[j % len(PALETTE)] for j, _ in segs])
    png = io.BytesIO()
    pil.save(png, format="PNG")
    pngs[overlay_name(k)] = png.getvalue()
  stale = [name for name in previous_outputs(out) if name not in pngs]
  # The previous prediction.json goes first: while the overlays change, none describes them.
  for name in sorted(stale, key=lambda n: n != PREDICTION_FILE):
    (out / name).unlink()
  for name, data in pngs.items():
    paths.write_bytes_atomic(out / name, data)
  paths.write_text_atomic(out / PREDICTION_FILE, json.dumps(record, indent=1))
  return record


def check_request(question: str, num_images: int, max_images: int) -> None:
  """InputError for an empty question, no image, or more images than the model takes."""
  from prima_jax.inference.engine import InputError  # noqa: PLC0415
  if not question or not question.strip():
    raise InputError("the question is empty (--question)")
  if not num_images:
    raise InputError("no image given (--image PATH, repeatable)")
  if num_images > max_images:
    raise InputError(f"{num_images} images given; the model takes at most {max_images}")


class Session:
  """A loaded model that answers questions: weights, tokenisers and the compiled predictor, kept
  between questions (the command line asks one; the web demo, :mod:`prima_jax.demo`, many).

  Args:
    opened: ``prima_jax.inference.loading.open_run(config, checkpoint)``.
    data_dir: directory holding ``tokenizers/`` (default: the run's data).
    max_new_tokens: generation budget in tokens.
  """

  def __init__(self, opened, *, data_dir: str | None = None, max_new_tokens: int = 128):
    from prima_jax.inference.engine import Predictor  # noqa: PLC0415
    from prima_jax.inference.loading import load  # noqa: PLC0415
    self.opened = opened
    self.loaded = load(opened, data_dir=data_dir, build_missing_tokenizers=True)
    self.max_new_tokens = max_new_tokens
    self.predictor = Predictor(self.loaded.model, self.loaded.tokenizers, max_new_tokens=max_new_tokens,
                               max_question_length=self.loaded.config.data.max_question_length)

  @property
  def max_images(self) -> int:
    return int(self.loaded.config.model.prima.max_images)

  def answer(self, images: Sequence[np.ndarray], question: str, *, temperature: float = 0.0,
             top_p: float = 1.0, seed: int = 0, answer_prefix: str | None = None):
    """The grounded answer to ``question`` about ``images`` (uint8 [H, W, 3] each, IMAGE1 first).

    Returns (prediction, meta): the :class:`prima_jax.inference.grounding.Prediction` and the record's
    run fields (checkpoint, step, seconds, sampling, max_new_tokens). Raises InputError (see
    :func:`check_request`, and a prompt too long for the model).
    """
    from prima_jax.inference.generate import SamplingConfig  # noqa: PLC0415
    check_request(question, len(images), self.max_images)
    sampling = SamplingConfig(temperature=temperature, top_p=top_p, seed=seed)
    example = self.predictor.prepare(list(images), question, forced_answer=answer_prefix, forced_eos=False,
                                     seed=seed)
    t0 = time.time()
    prediction = self.predictor.predict([example], sampling)[0]
    meta = dict(checkpoint=self.opened.checkpoint, step=self.loaded.step, seconds=round(time.time() - t0, 3),
                sampling=dict(temperature=temperature, top_p=top_p, seed=seed),
                max_new_tokens=self.max_new_tokens)
    return prediction, meta


def run(*, config=None, checkpoint: str | None = None, image_paths: Sequence[str], question: str,
        out_dir: str, data_dir: str | None = None, max_new_tokens: int = 128, temperature: float = 0.0,
        top_p: float = 1.0, seed: int = 0, answer_prefix: str | None = None, overwrite: bool = False) -> dict:
  """Reads the images, predicts, writes ``out_dir``; returns the prediction record.

  Raises, before the model is built: paths.PathError (an unusable --out, --checkpoint or --image
  URL, an --out that is a file), FileExistsError (``out_dir`` holds a previous prediction and not
  ``overwrite``), workdir.NotAWorkdir (no checkpoint there), InputError (bad image path or content,
  image count, empty question).
  """
  from prima_jax.inference.loading import open_run  # noqa: PLC0415

  check_out(out_dir, overwrite=overwrite)
  opened = open_run(config, checkpoint)
  check_request(question, len(image_paths), opened.config.model.prima.max_images)
  images = [read_image(p) for p in image_paths]
  session = Session(opened, data_dir=data_dir, max_new_tokens=max_new_tokens)
  prediction, meta = session.answer(images, question, temperature=temperature, top_p=top_p, seed=seed,
                                    answer_prefix=answer_prefix)
  image_urls = [str(paths.resolve(p, what="--image")) for p in image_paths]
  return write_outputs(out_dir, prediction, images, image_urls, question, meta)


def format_record(record: dict) -> str:
  lines = [f"answer: {record['answer']}"]
  for j, s in enumerate(record["segs"]):
    lines.append(f"  [SEG] {j + 1}: {s['phrase']!r} -> IMAGE{s['image']}  area {s['area']} px  "
                 f"score {s['score']:.3f}")
  for d in record["dropped"]:
    lines.append(f"  [SEG] without mask ({d['reason']}): {d['phrase']!r}")
  return "\n".join(lines)


def main(argv) -> int:
  del argv
  from prima_jax.inference.engine import InputError  # noqa: PLC0415
  from prima_jax.workdir import IncompatibleCheckpoint, NotAWorkdir  # noqa: PLC0415
  if _OUT.value is None:
    print("error: --out is required", file=sys.stderr)
    return 2
  try:
    record = run(config=_CONFIG.value, checkpoint=_CHECKPOINT.value, image_paths=_IMAGES.value,
                 question=_QUESTION.value, out_dir=_OUT.value, data_dir=_DATA_DIR.value,
                 max_new_tokens=_MAX_NEW_TOKENS.value, temperature=_TEMPERATURE.value, top_p=_TOP_P.value,
                 seed=_SEED.value, answer_prefix=_ANSWER_PREFIX.value, overwrite=_OVERWRITE.value)
  except (paths.PathError, NotAWorkdir, IncompatibleCheckpoint, InputError, OSError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    return 2
  print(format_record(record))
  print(f"wrote {paths.resolve(_OUT.value) / PREDICTION_FILE} and {len(_IMAGES.value)} overlay PNG(s) "
        f"({record['seconds']:.2f} s including compilation)", flush=True)
  return 0


if __name__ == "__main__":
  # Flags are defined only when run as a program, so that importing the module defines none.
  _CONFIG, _CHECKPOINT = cli.define_run_flags()
  _IMAGES = flags.DEFINE_multi_string("image", [], "Image file, local or a URL (repeat for IMAGE1, IMAGE2, "
                                      "...).")
  _QUESTION = flags.DEFINE_string("question", "", "The question.")
  _OUT = flags.DEFINE_string("out", None, "Output directory (local or a URL such as gs://bucket/pred).")
  _DATA_DIR = flags.DEFINE_string("data_dir", None, "Directory holding tokenizers/ (default: the run data).")
  _MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 128, "Generation budget in tokens.")
  _TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0 = greedy; > 0 samples.")
  _TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass.")
  _SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
  _ANSWER_PREFIX = flags.DEFINE_string("answer_prefix", None, "Force the answer to start with this text.")
  _OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace a previous prediction in --out.")
  cli.run(main)
