"""Predictor (masks from decode hidden states, batching, compiled-shape reuse) and the predict CLI."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from prima_jax import predict
from prima_jax.data import synthetic
from prima_jax.data.tokenizer import build_synthetic_tokenizers
from prima_jax.evaluation.rle import decode_rle
from prima_jax.inference.engine import InputError, Predictor
from prima_jax.models.batch import collate
from prima_jax.models.configs import tiny_config
from prima_jax.models.prima import Prima
from prima_jax.models.sam.sam import postprocess_masks

from parity_utils import test_seed

T = 32
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ANSWER_2 = "<p> red circle </p> [SEG] (IMAGE2) and <p> blue square </p> [SEG] (IMAGE1)"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  cfg = tiny_config()
  toks = build_synthetic_tokenizers(synthetic.vocabulary(), tmp_path_factory.mktemp("tok"),
                                    first_added_id=cfg.prima.first_added_id)
  cfg.qformer.vocab_size = toks[1].vocab_size
  model = Prima(cfg, rngs=nnx.Rngs(0))
  model.eval()
  return cfg, model, toks


@pytest.fixture(scope="module")
def batched(setup):
  cfg, model, toks = setup
  return Predictor(model, toks, max_new_tokens=T, batch_size=3, prompt_buckets=(64, 128))


def _images(rng, sizes):
  return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]


def test_masks_match_the_teacher_forced_forward_pass(setup, batched):
  """Masks from the decode loop's hidden states equal those of Prima.__call__ on the whole sequence."""
  cfg, model, toks = setup
  rng = np.random.default_rng(0)
  images = _images(rng, [(40, 60), (50, 30)])
  ex = batched.prepare(images, "Which shapes are red?", forced_answer=ANSWER_2)
  pred = batched.predict([ex])[0]
  assert [s.image_index for s in pred.segs] == [1, 0] and [s.phrase for s in pred.segs] == ["red circle",
                                                                                             "blue square"]
  ids = np.concatenate([ex.input_ids, ex.forced_ids]).astype(np.int32)
  seg_positions = np.flatnonzero(ids == cfg.prima.seg_token_id)
  example = dict(eva_images=ex.eva_images, sam_images=ex.sam_images, sam_sizes=ex.sam_sizes, input_ids=ids,
                 qformer_input_ids=ex.qformer_input_ids, seg_positions=seg_positions,
                 seg_image_index=np.asarray([1, 0], np.int32))
  batch = collate([example], cfg, num_images=cfg.prima.max_images, text_length=batched.max_question_length)
  batch.pop("labels"), batch.pop("gt_masks")
  graphdef, state = nnx.split(model)
  forward = jax.jit(lambda st, b: nnx.merge(graphdef, st)(b)["mask_logits"])
  ref = forward(state, {k: jnp.asarray(v) for k, v in batch.items()})[0]
  for j, seg in enumerate(pred.segs):
    k = seg.image_index
    logits = np.asarray(postprocess_masks(ref[j], tuple(ex.sam_sizes[k]), images[k].shape[:2]))
    assert seg.mask.shape == images[k].shape[:2]
    confident = np.abs(logits) > 1e-3
    np.testing.assert_array_equal(seg.mask[confident], (logits > 0)[confident])
    assert 0 < seg.area < seg.mask.size  # a real mask, not all or nothing


def test_batched_prediction_equals_one_at_a_time(setup, batched):
  cfg, model, toks = setup
  rng = np.random.default_rng(1)
  single = Predictor(model, toks, max_new_tokens=T, batch_size=1, prompt_buckets=(64, 128),
                     padding_side="right")
  examples = [
      batched.prepare(_images(rng, [(40, 60), (64, 20)]), "Which shapes are red?", forced_answer=ANSWER_2),
      batched.prepare(_images(rng, [(33, 33)]), "What is there?"),
      batched.prepare(_images(rng, [(70, 50), (20, 30), (64, 64)]), "Count the circles.",
                      forced_answer="<p> circle </p> [SEG] (IMAGE3)", forced_eos=False),
  ]
  many = batched.predict(examples)
  ones = single.predict(examples)
  for a, b in zip(many, ones):
    assert a.answer == b.answer and a.token_ids == b.token_ids
    assert [(s.phrase, s.image_index, s.token_index) for s in a.segs] == \
           [(s.phrase, s.image_index, s.token_index) for s in b.segs]
    for sa, sb in zip(a.segs, b.segs):
      assert np.mean(sa.mask != sb.mask) < 1e-3
      assert abs(sa.score - sb.score) < 1e-4
  assert len(many[0].segs) == 2 and len(many[2].segs) >= 1


def test_image_counts_and_sizes_reuse_compiled_shapes(batched):
  rng = np.random.default_rng(2)
  def ex(sizes):
    answer = " ".join(f"<p> shape </p> [SEG] (IMAGE{k + 1})" for k in range(min(2, len(sizes))))
    return batched.prepare(_images(rng, sizes), "Where?", forced_answer=answer)
  batched.predict([ex([(40, 60), (50, 30)])])
  before = dict(batched.trace_counts)
  batched.predict([ex([(17, 90), (64, 64), (30, 31)]), ex([(45, 45), (12, 80)])])
  batched.predict([ex([(100, 20), (20, 100)]), ex([(64, 48), (10, 10), (33, 60)]), ex([(50, 50), (60, 20)])])
  assert dict(batched.trace_counts) == before, (before, batched.trace_counts)
  assert before == {"generate": 1, "sam_encode": 1, "decode_masks": 1}


def test_one_image_and_each_mask_bucket_compile_once(setup):
  """1 image, then more images and masks: sam_encode retraces only for a new P (distinct mask images, next
  power of two), decode_masks only for a new M (masks, next power of two) or P (it reads the P encoded
  images); image sizes and counts (one N bucket: the tiny model's 3 images) and prompt lengths inside one
  L bucket never retrace (generate compiles once)."""
  cfg, model, toks = setup
  predictor = Predictor(model, toks, max_new_tokens=48, batch_size=2, prompt_buckets=(128,))
  rng = np.random.default_rng(test_seed())

  def ask(*examples):
    """examples: (image sizes, 1-based images of the answer's masks in order); returns the new traces."""
    before = dict(predictor.trace_counts)
    rows = [predictor.prepare(_images(rng, sizes), "Where?",
                              forced_answer=" ".join(f"<p> shape </p> [SEG] (IMAGE{k})" for k in masks))
            for sizes, masks in examples]
    predictions = predictor.predict(rows)
    for (_, masks), p in zip(examples, predictions):
      assert [s.image_index + 1 for s in p.segs[:len(masks)]] == masks
    return {k: v - before.get(k, 0) for k, v in predictor.trace_counts.items() if v != before.get(k, 0)}

  assert ask(([(40, 60)], [1])) == {"generate": 1, "sam_encode": 1, "decode_masks": 1}  # P = 1, M = 1
  assert ask(([(17, 90)], [1]), ([(64, 64), (30, 31), (9, 50)], [3])) == {}               # sizes, counts
  assert ask(([(40, 60), (50, 30)], [1, 2])) == {"sam_encode": 1, "decode_masks": 1}     # P = 2, M = 2
  assert ask(([(33, 33), (20, 70), (12, 12)], [2, 3])) == {}                              # P = 2, M = 2
  assert ask(([(40, 60), (50, 30)], [1, 1, 2])) == {"decode_masks": 1}                   # P = 2, M = 4
  assert ask(([(40, 60), (50, 30), (30, 30)], [1, 2, 3])) == {"sam_encode": 1,           # P = 3 (4 capped
                                                             "decode_masks": 1}         # at N), M = 4
  assert ask(([(8, 8)], [1]), ([(10, 10), (11, 11)], [2, 1, 2])) == {}                    # P = 2, M = 4


def test_prepare_rejects_bad_inputs(batched):
  ok = np.zeros((8, 8, 3), np.uint8)
  with pytest.raises(InputError, match="empty"):
    batched.prepare([ok], "   ")
  with pytest.raises(InputError, match="4 images"):
    batched.prepare([ok] * 4, "q?")
  with pytest.raises(InputError, match="image 2"):
    batched.prepare([ok, np.zeros((8, 8), np.uint8)], "q?")


def _write_images(tmp_path, sizes):
  rng = np.random.default_rng(3)
  paths = []
  for k, (h, w) in enumerate(sizes):
    path = tmp_path / f"im{k}.png"
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    paths.append(str(path))
  return paths


def test_predict_writes_rle_and_overlays(tmp_path):
  from configs.demo import get_config
  paths = _write_images(tmp_path, [(48, 40), (30, 56)])
  out = tmp_path / "out"
  record = predict.run(config=get_config("test"), image_paths=paths, question="Which shapes are red?",
                       out_dir=str(out), max_new_tokens=32,
                       answer_prefix="<p> red circle </p> [SEG] (IMAGE2) <p> cube </p> [SEG] (IMAGE1)")
  saved = json.loads((out / "prediction.json").read_text())
  assert saved["answer"] == record["answer"] and saved["image_index_base"] == 1
  assert len(saved["segs"]) >= 2
  assert [s["image"] for s in saved["segs"][:2]] == [2, 1]
  sizes = {1: (48, 40), 2: (30, 56)}
  for s in saved["segs"]:
    mask = decode_rle(s["mask"])
    assert mask.shape == sizes[s["image"]] and mask.dtype == bool
    assert s["area"] == int(mask.sum())
  for k in (1, 2):
    png = Image.open(out / f"image{k}_overlay.png")
    scale = predict.overlay_scale(*sizes[k])
    assert png.size == (sizes[k][1] * scale, sizes[k][0] * scale)


def test_predict_errors(tmp_path):
  from configs.demo import get_config
  good = _write_images(tmp_path, [(20, 20)])
  with pytest.raises(InputError, match="nope.png"):
    predict.run(config=get_config("test"), image_paths=[good[0], str(tmp_path / "nope.png")], question="q?",
                out_dir=str(tmp_path / "o"))
  with pytest.raises(InputError, match="at most 5"):
    predict.run(config=get_config("test"), image_paths=good * 6, question="q?", out_dir=str(tmp_path / "o"))
  (tmp_path / "bad.png").write_bytes(b"not an image")
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-m", "prima_jax.predict", "--config=configs/demo.py:test",
                         f"--image={tmp_path / 'bad.png'}", "--question=What?", f"--out={tmp_path / 'o'}"],
                        capture_output=True, text=True, env=env, cwd=ROOT)
  assert proc.returncode == 2 and "bad.png" in proc.stderr, proc.stderr[-2000:]
  proc = subprocess.run([sys.executable, "-m", "prima_jax.predict", "--config=configs/demo.py:test",
                         f"--image={good[0]}", "--question=", f"--out={tmp_path / 'o'}"],
                        capture_output=True, text=True, env=env, cwd=ROOT)
  assert proc.returncode == 2 and "question is empty" in proc.stderr, proc.stderr[-2000:]


# --- many images: directories, globs, the contact sheet and the page ---------------------------------------

# The answer forced in the collection below: masks 1 and 3 on IMAGE2, mask 2 on IMAGE6.
COLLECTION_ANSWER = "<p> a dog </p> [SEG] (IMAGE2) <p> cat </p> [SEG] (IMAGE6) <p> ball </p> [SEG] (IMAGE2)"
COLLECTION_MASKS = {1: [0, 2], 5: [1]}  # 0-based image -> 0-based masks


def _grey_image(path, h, w, rng):
  """A grey noise image (R = G = B): no pixel of it has a PALETTE colour, so any such pixel is a mask's."""
  Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8)).save(path)


def _cli(args, cwd=ROOT):
  return subprocess.run([sys.executable, "-m", "prima_jax.predict", "--config=configs/demo.py:test", *args],
                        capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"),
                        cwd=cwd, timeout=600)


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
  """7 images (a directory of 5 and a glob matching 2) answered by the CLI with --overwrite into an
  --out holding a previous prediction; returns (out dir, record, image paths in IMAGEk order, stdout)."""
  root = tmp_path_factory.mktemp("collection")
  rng = np.random.default_rng(test_seed())
  frames, extra = root / "frames", root / "extra"
  frames.mkdir(), extra.mkdir()
  # Natural order of the names: frame1, frame2, Frame3, frame9, frame10 (suffixes of any case).
  for name, (h, w) in [("frame10.png", (36, 48)), ("frame2.png", (48, 36)), ("Frame3.JPG", (30, 30)),
                       ("frame1.png", (40, 64)), ("frame9.webp", (36, 48))]:
    _grey_image(frames / name, h, w, rng)
  (frames / "notes.txt").write_text("not an image")
  _grey_image(frames / ".hidden.png", 8, 8, rng)
  (frames / "sub.png").mkdir()  # a directory, however named, is not an image
  for name in ("b2.png", "b10.png", "a.jpg"):
    _grey_image(extra / name, 50, 40, rng)
  out = root / "out"
  out.mkdir()
  # A previous prediction: its prediction.json, an overlay of IMAGE1 (no mask now), one of an image that
  # no longer exists, an old page; and a file of the user's, which stays.
  for name in ("prediction.json", "image1_overlay.png", "image12_overlay.png", "index.html", "keep.txt"):
    (out / name).write_text("old")
  proc = _cli([f"--image={frames}", f"--image={extra}/b*.png", "--question=Where is the dog?",
               f"--out={out}", "--overwrite", "--max_new_tokens=28", f"--answer_prefix={COLLECTION_ANSWER}",
               "--config.model.prima.max_images=7"])
  assert proc.returncode == 0, proc.stderr[-3000:]
  record = json.loads((out / "prediction.json").read_text())
  order = [frames / n for n in ("frame1.png", "frame2.png", "Frame3.JPG", "frame9.webp", "frame10.png")]
  order += [extra / "b2.png", extra / "b10.png"]
  return out, record, [str(p) for p in order], proc.stdout


def test_directory_and_glob_expand_in_natural_order(collection):
  out, record, order, stdout = collection
  assert record["images"] == order
  assert record["num_images"] == 7 and [s["image"] for s in record["segs"]] == [2, 6, 2]
  assert all(s["area"] > 0 for s in record["segs"])
  assert "2 overlay PNG(s) (the images with masks, of 7)" in stdout, stdout


def test_overlays_only_for_masked_images_and_stale_files_removed(collection):
  out, record, _, _ = collection
  assert sorted(os.listdir(out)) == ["contact_sheet.png", "image2_overlay.png", "image6_overlay.png",
                                     "index.html", "keep.txt", "prediction.json"]
  assert record["overlays"] == [None, "image2_overlay.png", None, None, None, "image6_overlay.png", None]
  assert (out / "keep.txt").read_text() == "old"
  assert Image.open(out / "image2_overlay.png").size == (36 * predict.overlay_scale(48, 36),
                                                         48 * predict.overlay_scale(48, 36))


def _colour_cells(sheet: np.ndarray, num_images: int, columns: int, num_colours: int) -> dict:
  """{(0-based image, 0-based mask colour): pixels of exactly PALETTE[j] in the image's grid cell}."""
  cw, ch = 160 + 2 * 8, 160 + 2 * 8 + 32  # THUMB_SIDE + padding (+ the label)
  found = {}
  for k in range(num_images):
    row, col = divmod(k, columns)
    cell = sheet[row * ch:(row + 1) * ch, col * cw:(col + 1) * cw]
    for j in range(num_colours):
      found[k, j] = int(np.all(cell == predict.PALETTE[j].astype(np.uint8), axis=-1).sum())
  return found


def test_contact_sheet_grid_and_mask_colours(collection):
  out, record, _, _ = collection
  sheet = np.asarray(Image.open(out / "contact_sheet.png").convert("RGB"))
  assert (predict.CELL_WIDTH, predict.CELL_HEIGHT) == (176, 208)
  assert sheet.shape == (208, 7 * 176, 3)  # 7 images: one row of 7 cells
  found = _colour_cells(sheet, 7, 7, 3)
  for (k, j), count in found.items():
    assert (count > 0) == (j in COLLECTION_MASKS.get(k, [])), (k, j, found)


def test_index_html_links_to_existing_overlays(collection):
  import html.parser
  out, record, _, _ = collection

  class Links(html.parser.HTMLParser):
    def __init__(self):
      super().__init__()
      self.links, self.ids, self.figures, self.marks, self._figure = [], set(), {}, [], None

    def handle_starttag(self, tag, attrs):
      attrs = dict(attrs)
      if "id" in attrs:
        self.ids.add(attrs["id"])
      if tag == "figure":
        self._figure = attrs["id"]
        self.figures[self._figure] = []
      for key in ("href", "src"):
        if key in attrs:
          self.links.append(attrs[key])
          if self._figure and key == "href":
            self.figures[self._figure].append(attrs[key])
      if tag == "mark":
        self.marks.append(attrs["style"])

    def handle_endtag(self, tag):
      if tag == "figure":
        self._figure = None

  page = Links()
  page.feed((out / "index.html").read_text())
  assert sorted(page.figures) == sorted(f"image{k}" for k in range(1, 8))
  for k in range(7):
    assert page.figures[f"image{k + 1}"] == ([f"image{k + 1}_overlay.png"] if k in COLLECTION_MASKS else [])
  files = [u for u in page.links if not u.startswith(("data:image/", "#"))]
  assert set(files) == {"prediction.json", "contact_sheet.png", "image2_overlay.png", "image6_overlay.png"}
  for u in files:
    assert (out / u).is_file(), u
  assert {u[1:] for u in page.links if u.startswith("#")} == {"image2", "image6"} <= page.ids
  hexes = ["#" + "".join(f"{int(c):02x}" for c in predict.PALETTE[j]) for j in range(3)]
  assert [m.split(";")[0] for m in page.marks] == [f"background:{h}" for h in hexes]
  assert "Where is the dog?" in (out / "index.html").read_text()


def test_expand_image_args(tmp_path):
  rng = np.random.default_rng(0)
  (tmp_path / "d").mkdir()
  for name in ("x10.png", "x9.TIFF", "x1.gif", "a[1].png"):
    _grey_image(tmp_path / "d" / name, 4, 4, rng)
  expanded = predict.expand_image_args([str(tmp_path / "d" / "a[1].png"), str(tmp_path / "d"),
                                        str(tmp_path / "d" / "x?.*"), str(tmp_path / "d" / "x1.gif")])
  assert [e.kind for e in expanded] == ["file", "directory", "glob", "file"]  # an existing name: no pattern
  assert [[os.path.basename(f) for f in e.files] for e in expanded] == [
      ["a[1].png"], ["a[1].png", "x1.gif", "x9.TIFF", "x10.png"], ["x1.gif", "x9.TIFF"], ["x1.gif"]]
  assert predict.describe_image_args(expanded) == (f"1 file, 4 from --image={tmp_path / 'd'}, "
                                                   f"2 from --image={tmp_path / 'd' / 'x?.*'}, 1 file")


def test_glob_and_directory_on_an_object_store(object_store):
  rng = np.random.default_rng(0)
  for name in ("f2.png", "f10.png", "f1.png", "notes.txt"):
    path = object_store.local(object_store.url("clips", name))
    path.parent.mkdir(parents=True, exist_ok=True)
    _grey_image(path, 4, 4, rng) if name.endswith(".png") else path.write_text("x")
  expanded = predict.expand_image_args([object_store.url("clips", "f1*.png"), object_store.url("clips")])
  assert [list(e.files) for e in expanded] == [
      [object_store.url("clips", n) for n in ("f1.png", "f10.png")],
      [object_store.url("clips", n) for n in ("f1.png", "f2.png", "f10.png")]]


@pytest.mark.parametrize("case", ["empty directory", "no match", "too many"])
def test_image_expansion_errors(case, tmp_path):
  """One error line, status 2, before the model is built; nothing written."""
  (tmp_path / "empty").mkdir()
  (tmp_path / "empty" / "notes.txt").write_text("not an image")
  (tmp_path / "six").mkdir()
  for k in range(6):
    (tmp_path / "six" / f"{k}.png").write_bytes(b"never read: the count is refused first")
  empty, pattern, six = tmp_path / "empty", tmp_path / "*.jpg", tmp_path / "six"
  image, message = {
      "empty directory": (empty, f"error: --image={empty}: the directory holds no image file (.png .jpg"),
      "no match": (pattern, f"error: --image={pattern}: the pattern matches no file"),
      "too many": (six, f"error: 6 images given (6 from --image={six}); the model takes at most 5"),
  }[case]
  proc = _cli([f"--image={image}", "--question=q?", f"--out={tmp_path / 'out'}"])
  errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
  assert proc.returncode == 2 and len(errors) == 1 and errors[0].startswith(message), proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr and not (tmp_path / "out").exists()


def test_contact_sheet_wraps_rows_and_demo_writes_every_overlay(tmp_path):
  """write_outputs as the web demo calls it: 10 images, a mask on IMAGE10 and a one-pixel one on a large
  IMAGE4 (under a thumbnail pixel: still drawn)."""
  from prima_jax.inference.grounding import Prediction, SegPrediction
  images = [np.full((20, 30, 3), 100, np.uint8) for _ in range(10)]
  images[3] = np.full((400, 400, 3), 100, np.uint8)
  mask, dot = np.zeros((20, 30), bool), np.zeros((400, 400), bool)
  mask[5:15, 10:20] = True
  dot[200, 200] = True
  pred = Prediction(answer="<p> it </p> [SEG] (IMAGE10) <p> dot </p> [SEG] (IMAGE4)",
                    segs=[SegPrediction("it", 9, mask, 0.9, 3), SegPrediction("dot", 3, dot, 0.9, 9)],
                    dropped=[], token_ids=[], finished=True, num_images=10,
                    image_sizes=[im.shape[:2] for im in images])
  record = predict.write_outputs(tmp_path, pred, images, [f"f{k}.png" for k in range(10)], "q?", {})
  assert sorted(os.listdir(tmp_path)) == sorted(["contact_sheet.png", "index.html", "prediction.json"]
                                                + [f"image{k}_overlay.png" for k in range(1, 11)])
  assert record["overlays"] == [f"image{k}_overlay.png" for k in range(1, 11)]
  sheet = np.asarray(Image.open(tmp_path / "contact_sheet.png").convert("RGB"))
  assert sheet.shape == (2 * 208, 8 * 176, 3)  # 8 columns, 2 rows
  found = _colour_cells(sheet, 10, 8, 2)
  assert [k for k in range(10) if found[k, 0]] == [9] and [k for k in range(10) if found[k, 1]] == [3]
