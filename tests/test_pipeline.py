"""The Grain pipeline on synthetic GroundedExamples with the synthetic tokenisers (tiny config).

Each synthetic image carries its identity in constant channels (red = example number, green =
image number), which survive every resize exactly, so a batch row can be traced back to its source.
"""

import dataclasses
import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from prima_jax.data import preprocess as pp
from prima_jax.data.example import GroundedExample
from prima_jax.data.pipeline import (
    DROP_REASONS,
    DropCounter,
    make_dataset,
    prepare_example,
    to_global_batch,
)
from prima_jax.data.tokenizer import build_synthetic_tokenizers
from prima_jax.models import batch as batch_lib
from prima_jax.models.configs import tiny_config
from prima_jax.sharding import make_mesh

MAX_LENGTH = 160
WORDS = "which object is red round shown in both images the thing and a".split()


@pytest.fixture(scope="module")
def cfg():
  return tiny_config()


@pytest.fixture(scope="module")
def toks(tmp_path_factory):
  return build_synthetic_tokenizers(WORDS, tmp_path_factory.mktemp("tok"),
                                    first_added_id=tiny_config().prima.first_added_id)


def make_example(i: int, rng: np.random.Generator, *, num_images: int | None = None,
                 num_masks: int | None = None, question: str = "which object is red?") -> GroundedExample:
  n = int(rng.integers(1, 4)) if num_images is None else num_images
  m = int(rng.integers(0, 5)) if num_masks is None else num_masks
  images = []
  for k in range(n):
    h, w = rng.integers(12, 90, 2)
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    image[..., 0] = i          # identity: example
    image[..., 1] = 40 * k     # identity: image
    images.append(image)
  mask_image = rng.integers(0, n, m).tolist()
  masks = []
  for k in mask_image:
    h, w = images[k].shape[:2]
    mask = np.zeros((h, w), bool)
    top, left = rng.integers(0, h), rng.integers(0, w)
    mask[top:top + rng.integers(1, h), left:left + rng.integers(1, w)] = True
    masks.append(mask)
  answer = " and ".join(f"the <p> thing_{j} </p> [SEG] (IMAGE{k + 1})" for j, k in enumerate(mask_image))
  return GroundedExample(
      example_id=f"synthetic/{i}", source="synthetic", category="open-ended", images=images,
      image_ids=[f"{i}_{k}" for k in range(n)], question=question,
      answer=(answer or "nothing") + ".", phrases=[f"thing_{j}" for j in range(m)],
      mask_image=mask_image, masks=masks)


def make_examples(count: int, seed: int = 0) -> list[GroundedExample]:
  rng = np.random.default_rng(seed)
  return [make_example(i, rng) for i in range(count)]


def dataset(source, cfg, toks, **kw):
  kw = dict(batch_size=2, train=True, seed=0, max_length=MAX_LENGTH,
            max_question_length=cfg.qformer.max_text_length, shard_index=0, shard_count=1) | kw
  return make_dataset(source, cfg=cfg, tokenizers=toks, **kw)


def row_identity(batch, b: int) -> tuple[int, int]:
  """(example number, image count) of batch row b, read from the constant channels."""
  example = int(batch["sam_images"][b, 0, 0, 0, 0])  # uint8 pixels
  return example, int(batch["image_valid"][b].sum())


def is_blank(batch, b: int) -> bool:
  """Row b is a dropped example's zero-weight stand-in: no label, no [SEG]."""
  return not (batch["labels"][b] != batch_lib.IGNORE_LABEL).any() and not batch["seg_valid"][b].any()


def check_batch_against_sources(batch, examples, cfg):
  """Every row matches its source example (images, sizes, [SEG] routing, masks) or is a blank (None)."""
  s = cfg.sam.image_size
  ids = []
  for b in range(len(batch["input_ids"])):
    if is_blank(batch, b):
      assert batch["image_valid"][b].sum() == 1 and not batch["sam_images"][b].any()
      ids.append(None)
      continue
    i, n = row_identity(batch, b)
    ex = examples[i]
    ids.append(i)
    assert n == len(ex.images)
    for k, image in enumerate(ex.images):
      assert batch["sam_images"].dtype == np.uint8  # normalised on the device
      assert int(batch["sam_images"][b, k, 0, 0, 1]) == 40 * k
      sam, hw = pp.sam_resize(image, s)
      np.testing.assert_array_equal(batch["sam_images"][b, k], sam)
      np.testing.assert_array_equal(batch["sam_sizes"][b, k], hw)
    m = len(ex.masks)
    assert batch["seg_valid"][b].sum() == m
    np.testing.assert_array_equal(batch["seg_image_index"][b, :m], ex.mask_image)
    pos = batch["seg_positions"][b, :m]
    assert (np.diff(pos) > 0).all()  # the j-th [SEG] of the text owns the j-th mask
    assert (batch["input_ids"][b, pos] == cfg.prima.seg_token_id).all()
    assert (batch["labels"][b, pos] == cfg.prima.seg_token_id).all()
    for j, mask in enumerate(ex.masks):
      np.testing.assert_array_equal(batch["gt_masks"][b, j], pp.mask_to_sam_frame(mask, s))
    assert not batch["gt_masks"][b, m:].any()
  return ids


def test_prepare_example_eval(cfg, toks):
  ex = make_example(3, np.random.default_rng(1), num_images=2, num_masks=3)
  out = prepare_example(ex, cfg=cfg, tokenizers=toks, train=False, rng=None, max_length=MAX_LENGTH,
                        max_question_length=16)
  s, v = cfg.sam.image_size, cfg.vision.image_size
  assert out["eva_images"].shape == (2, v, v, 3) and out["sam_images"].shape == (2, s, s, 3)
  assert out["gt_masks"].shape == (3, s, s) and out["seg_positions"].shape == (3,)
  for k, image in enumerate(ex.images):
    np.testing.assert_array_equal(out["eva_images"][k], pp.eva_resize(image, v, train=False))
  np.testing.assert_array_equal(out["seg_image_index"], ex.mask_image)
  nq = cfg.qformer.num_query_tokens
  assert (out["input_ids"] == cfg.prima.image_token_id).sum() == 2 * nq
  assert (out["input_ids"][out["seg_positions"]] == cfg.prima.seg_token_id).all()


def test_batches_route_every_seg_to_its_image_and_mask(cfg, toks):
  examples = make_examples(9, seed=1)
  assert sum(len(e.masks) for e in examples) >= 8 and {len(e.images) for e in examples} == {1, 2, 3}
  it = iter(dataset(examples, cfg, toks, batch_size=3, num_epochs=1))
  seen = []
  shapes = None
  for batch in it:
    batch_lib.validate_batch(batch, cfg, training=True)
    got = {k: v.shape for k, v in batch.items()}
    shapes = shapes or got
    assert got == shapes  # static shapes
    assert got["eva_images"] == (3, cfg.prima.max_images, 28, 28, 3)
    assert got["gt_masks"] == (3, cfg.prima.max_masks, 64, 64)
    assert got["input_ids"] == (3, MAX_LENGTH) and got["qformer_input_ids"] == (3, 16)
    seen += check_batch_against_sources(batch, examples, cfg)
  assert sorted(seen) == list(range(9))
  assert it.drops.total == 0


def _decode(raw):
  """Test decoder: {"example": GroundedExample} or a broken record."""
  return raw["example"]


def test_bad_examples_dropped_and_counted(cfg, toks):
  rng = np.random.default_rng(2)
  good = [make_example(i, rng, num_images=2, num_masks=2) for i in range(4)]
  bad = {}
  bad["too_many_images"] = make_example(10, rng, num_images=4, num_masks=1)
  bad["too_many_masks"] = make_example(11, rng, num_images=2, num_masks=5)
  bad["prompt_too_long"] = make_example(12, rng, num_images=1, num_masks=1,
                                        question="which object is red " * 40)
  ex = make_example(13, rng, num_images=2, num_masks=1)
  ex.masks[0] = np.zeros((3, 3), bool)              # mask not in the frame of its image
  bad["bad_example"] = ex
  ex = make_example(14, rng, num_images=2, num_masks=1)
  ex.answer = ex.answer.replace(f"(IMAGE{ex.mask_image[0] + 1})", "")   # [SEG] without (IMAGEk)
  bad["bad_prompt"] = ex
  ex = make_example(15, rng, num_images=2, num_masks=1)
  k = ex.mask_image[0]
  ex.images[1 - k] = ex.images[k].copy()            # same shape, so the mask fits either image
  ex.mask_image = [1 - k]                           # the text routes to one image, the mask to the other
  bad["seg_mask_mismatch"] = ex
  ex = make_example(16, rng, num_images=2, num_masks=1)
  ex.images[0] = ex.images[0].astype(np.float32)
  bad["bad_image"] = ex
  bad = list(bad.values())
  # In stream order (no shuffle): every dropped example keeps its row as a zero-weight blank.
  source = [{"example": e} for e in good[:2]] + [{"example_id": "broken/0"}]  # decode_error
  source += bad[:3] + good[2:] + bad[3:]
  cache_free = [r for r in DROP_REASONS if r != "missing_features"]  # that one: tests/test_feature_cache.py
  assert len(bad) + 1 == len(cache_free)

  it = iter(dataset(source, cfg, toks, batch_size=2, num_epochs=1, shuffle=False, decode=_decode))
  seen = []
  for batch in it:
    batch_lib.validate_batch(batch, cfg, training=True)
    seen += check_batch_against_sources(batch, {e_i: e for e_i, e in enumerate(good)}, cfg)
  assert seen == [0, 1] + [None] * 4 + [2, 3] + [None] * 4
  expected = dict(dict.fromkeys(DROP_REASONS, 0), **dict.fromkeys(cache_free, 1))
  assert it.drops.counts == expected
  assert it.get_state()["drops"] == expected
  assert "prompt_too_long=1" in it.drops.summary()


def test_all_dropped_raises_instead_of_spinning(cfg, toks):
  rng = np.random.default_rng(3)
  source = [make_example(i, rng, num_images=4, num_masks=0) for i in range(5)]
  it = iter(dataset(source, cfg, toks, max_consecutive_drops=5))
  next(it), next(it)  # four blank rows
  with pytest.raises(RuntimeError, match="5 examples in a row were dropped.*too_many_images=5"):
    next(it)


def test_drop_counter():
  c = DropCounter({"prompt_too_long": 2})
  c.add("decode_error")
  c.add_vector(np.eye(len(DROP_REASONS), dtype=np.int64)[DROP_REASONS.index("prompt_too_long")])
  assert c.counts["prompt_too_long"] == 3 and c.total == 4
  assert DropCounter(c.counts).counts == c.counts
  with pytest.raises(ValueError, match="unknown drop reason"):
    c.add("cosmic_rays")


def _assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_iterator_resumes_exactly(cfg, toks):
  examples = make_examples(5, seed=4)
  examples.append(make_example(5, np.random.default_rng(0), num_images=4, num_masks=0))  # dropped
  ds = dataset(examples, cfg, toks, batch_size=2, train=True, seed=7)  # repeats forever
  it = iter(ds)
  first = [next(it) for _ in range(3)]
  state = json.loads(json.dumps(it.get_state()))  # checkpointable as JSON (grain / Orbax)
  drops_at_state = it.drops.total
  rest = [next(it) for _ in range(4)]          # crosses an epoch boundary (5 kept per epoch)
  restored = iter(ds)
  restored.set_state(state)
  assert restored.drops.total == drops_at_state
  _assert_batches_equal([next(restored) for _ in range(4)], rest)
  assert restored.drops.counts == it.drops.counts and it.drops.total >= 2
  # A fresh iterator replays the stream from the start.
  _assert_batches_equal([next(iter(ds)) for _ in range(1)], first[:1])


def test_train_augmentation_and_epoch_order(cfg, toks):
  examples = make_examples(6, seed=5)
  it = iter(dataset(examples, cfg, toks, batch_size=1, num_epochs=2, seed=3))
  rows = [(row_identity(b, 0)[0], b["eva_images"][0]) for b in it]
  order = [i for i, _ in rows]
  assert sorted(order[:6]) == sorted(order[6:]) == list(range(6))
  assert order[:6] != order[6:]  # reshuffled per epoch
  first = {i: eva for i, eva in rows[:6]}
  # The same example gets a different random crop in the second epoch.
  assert any(not np.array_equal(first[i], eva) for i, eva in rows[6:])
  eval_rows = [b["eva_images"][0] for b in dataset(examples, cfg, toks, batch_size=1, num_epochs=1,
                                                   train=False)]
  for i, eva in enumerate(eval_rows):  # eval: no shuffle, plain resize
    np.testing.assert_array_equal(eva[0], pp.eva_resize(examples[i].images[0], 28, train=False))


def _global_batches(examples, cfg, toks, *, processes: int, global_batch: int = 4, **kw):
  """The global batches as ``processes`` processes would assemble them (rows of process 0 first)."""
  per_process = [list(dataset(examples, cfg, toks, batch_size=global_batch // processes, shard_index=p,
                              shard_count=processes, **kw)) for p in range(processes)]
  assert len({len(batches) for batches in per_process}) == 1
  return [{k: np.concatenate([batches[i][k] for batches in per_process]) for k in per_process[0][i]}
          for i in range(len(per_process[0]))]


def test_global_order_is_independent_of_the_process_count(cfg, toks):
  """1, 2 and 4 processes see the same global batches (same examples, same random crops, same
  drops), and a resume at global batch k continues that order with any process count."""
  examples = make_examples(9, seed=6)
  examples.append(make_example(9, np.random.default_rng(0), num_images=4, num_masks=0))  # dropped
  kw = dict(num_epochs=2, seed=5)  # 20 stream positions -> 5 global batches of 4
  one = _global_batches(examples, cfg, toks, processes=1, **kw)
  assert len(one) == 5
  ids = [row_identity(b, r)[0] if not is_blank(b, r) else None for b in one for r in range(4)]
  assert sorted(i for i in ids[:10] if i is not None) == list(range(9))   # epoch 1: each once ...
  assert ids.count(None) == 2                                             # ... and the dropped one blank
  for processes in (2, 4):
    _assert_batches_equal(_global_batches(examples, cfg, toks, processes=processes, **kw), one)
    resumed = _global_batches(examples, cfg, toks, processes=processes, start_batch=3, **kw)
    _assert_batches_equal(resumed, one[3:])
  with pytest.raises(ValueError, match="shard_index"):
    dataset(examples, cfg, toks, shard_index=2, shard_count=2)


def test_worker_processes_give_the_same_batches(cfg, toks):
  from absl import flags
  flags.FLAGS.mark_as_parsed()
  examples = make_examples(4, seed=8)
  examples.append(make_example(4, np.random.default_rng(0), num_images=4, num_masks=0))  # dropped
  it = iter(dataset(examples, cfg, toks, batch_size=1, num_epochs=1))
  one = list(it)
  it_mp = iter(dataset(examples, cfg, toks, batch_size=1, num_epochs=1, worker_count=1))
  try:
    two = list(it_mp)
  finally:
    it_mp.close()
  _assert_batches_equal(one, two)
  assert len(one) == 5
  assert it_mp.drops.counts == it.drops.counts and it.drops.counts["too_many_images"] == 1


def test_to_global_batch(cfg, toks):
  mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  batch = next(iter(dataset(make_examples(4, seed=9), cfg, toks, batch_size=4)))
  out = to_global_batch(batch, mesh)
  assert out.keys() == batch.keys()
  for k, v in out.items():
    assert isinstance(v, jax.Array) and v.shape == batch[k].shape, k
    np.testing.assert_array_equal(np.asarray(v), batch[k])
    assert v.sharding.spec[0] == ("data", "fsdp")
  shard_rows = {s.data.shape[0] for s in out["input_ids"].addressable_shards}
  assert shard_rows == {1}
  out = to_global_batch(batch, mesh, batch_axes=("data",))
  assert out["gt_masks"].sharding.spec[0] == "data"


def test_example_dataclass_is_not_mutated(cfg, toks):
  ex = make_example(0, np.random.default_rng(10), num_images=2, num_masks=2)
  before = dataclasses.replace(ex, images=[x.copy() for x in ex.images], masks=[m.copy() for m in ex.masks])
  prepare_example(ex, cfg=cfg, tokenizers=toks, train=True, rng=np.random.default_rng(0),
                  max_length=MAX_LENGTH, max_question_length=16)
  for a, b in zip(ex.images + ex.masks, before.images + before.masks):
    np.testing.assert_array_equal(a, b)


def test_bench_runs(capsys):
  from prima_jax import cli  # noqa: PLC0415
  from prima_jax.data import bench  # noqa: PLC0415 (imports the builder modules)
  cli.call(bench, ["--only", "tiny", "--batches", "1"])
  out = capsys.readouterr().out
  assert "samples/s" in out and "image decode" in out and "tokenisation" in out
  assert "with cached SAM features" in out and "with cached EVA + SAM features" in out


def test_synthetic_benchmark_through_the_tfds_source(cfg, tmp_path):
  """generate -> TFDS ArrayRecord build -> data_source -> pipeline (default m4seg decoding)."""
  from prima_jax.data import m4seg, synthetic
  synthetic.generate(str(tmp_path / "src"), seed=0, sizes={"train": 6}, image_size=48)
  m4seg.build({"train": [tmp_path / "src" / "Part_Segm" / "synthetic_train.json"]},
              {"synthetic": tmp_path / "src" / "synthetic"}, tmp_path / "data")
  source = m4seg.data_source(tmp_path / "data", "train")
  cfg = cfg.copy_and_resolve_references()
  cfg.prima.update(max_images=5, max_masks=12)
  toks = build_synthetic_tokenizers(synthetic.vocabulary(), tmp_path / "tok",
                                    first_added_id=cfg.prima.first_added_id)
  ds = dataset(source, cfg, toks, batch_size=2, num_epochs=1, train=False, max_length=384,
               max_question_length=32)
  it = iter(ds)
  batches = list(it)
  assert it.drops.total == 0 and len(batches) == len(source) // 2
  s = cfg.sam.image_size
  for n, batch in enumerate(batches):
    batch_lib.validate_batch(batch, cfg, training=True)
    for b in range(2):
      ex = m4seg.decode_example(source[2 * n + b])   # eval without shuffle: stream order = source order
      assert batch["image_valid"][b].sum() == len(ex.images) >= 2
      m = len(ex.masks)
      assert m >= 1 and batch["seg_valid"][b].sum() == m
      np.testing.assert_array_equal(batch["seg_image_index"][b, :m], ex.mask_image)
      for j, mask in enumerate(ex.masks):
        np.testing.assert_array_equal(batch["gt_masks"][b, j], pp.mask_to_sam_frame(mask, s))
      for k, image in enumerate(ex.images):
        np.testing.assert_array_equal(batch["sam_images"][b, k], pp.sam_resize(image, s)[0])


_TWO_PROCESS_SCRIPT = r"""
import json, os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["JAX_PLATFORMS"] = "cpu"
pid, port, tok_dir, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=pid)
from test_pipeline import make_examples, row_identity, MAX_LENGTH
from prima_jax.data.pipeline import make_dataset, to_global_batch
from prima_jax.data.tokenizer import load_synthetic_tokenizers
from prima_jax.models.configs import tiny_config
from prima_jax.sharding import make_mesh
cfg = tiny_config()
toks = load_synthetic_tokenizers(tok_dir, first_added_id=cfg.prima.first_added_id)
ds = make_dataset(make_examples(8, seed=6), cfg=cfg, tokenizers=toks,
                  batch_size=2, train=False, seed=0, max_length=MAX_LENGTH, max_question_length=16,
                  num_epochs=1)
ids, shapes = [], []
mesh = make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
for batch in ds:
  ids += [row_identity(batch, b)[0] for b in range(2)]
  shapes.append(to_global_batch(batch, mesh)["input_ids"].shape)
json.dump({"ids": ids, "shapes": shapes, "process_count": jax.process_count()}, open(out, "w"))
jax.distributed.shutdown()
"""


def test_two_processes_read_their_rows_of_each_global_batch(toks, tmp_path):
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  tok_dir = tmp_path / "tok"
  build_synthetic_tokenizers(WORDS, tok_dir)
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(__file__), os.getcwd(), env.get("PYTHONPATH", "")])
  procs = [subprocess.Popen([sys.executable, "-c", _TWO_PROCESS_SCRIPT, str(i), str(port), str(tok_dir),
                             str(tmp_path / f"out{i}.json")], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for i in range(2)]
  logs = [p.communicate(timeout=120)[0] for p in procs]
  assert all(p.returncode == 0 for p in procs), "\n".join(logs)[-3000:]
  out = [json.loads((tmp_path / f"out{i}.json").read_text()) for i in range(2)]
  assert all(o["process_count"] == 2 for o in out)
  assert len(out[0]["ids"]) == len(out[1]["ids"]) == 4
  # Global batch k = examples 4k..4k+3 (no shuffle); each process holds its two rows of it.
  assert out[0]["ids"] == [0, 1, 4, 5] and out[1]["ids"] == [2, 3, 6, 7]
  assert out[0]["shapes"] == out[1]["shapes"] == [[4, MAX_LENGTH]] * 2  # global batch = 2 hosts x 2
