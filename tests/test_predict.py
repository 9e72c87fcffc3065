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
  power of two), decode_masks only for a new M (masks, next power of two); image sizes and counts and
  prompt lengths inside one L bucket never retrace (generate compiles once)."""
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
  assert ask(([(40, 60), (50, 30), (30, 30)], [1, 2, 3])) == {"sam_encode": 1}           # P = 4, M = 4
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
