"""The frozen-tower feature cache: builder (prima_jax.data.cache), storage (prima_jax.data.features),
the pipeline and the train step reading it."""

import copy
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from prima_jax import workdir as workdir_lib
from prima_jax.data import cache as cache_lib
from prima_jax.data import features as feat
from prima_jax.data.pipeline import DISPLAY_KEY, make_dataset
from prima_jax.models.losses import prima_loss
from prima_jax.training import data as data_lib
from prima_jax.training.defaults import TRAINABLE_ALL_BUT_TOWERS
from prima_jax.training.loop import initial_parameters, train_and_evaluate
from prima_jax.training.validate import ConfigError, build_mesh

from parity_utils import worst_relative_difference

ROOT = Path(__file__).resolve().parents[1]
SHARD_IMAGES = 8


def load_config(arg="test", **data):
  spec = importlib.util.spec_from_file_location("cfg_demo_cache", ROOT / "configs" / "demo.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config(arg)
  c.data.update(dict(dict(eva_augment=False), **data))
  c.train.trainable = TRAINABLE_ALL_BUT_TOWERS
  c.mesh.update(data=4, fsdp=1, tensor=2)
  c.logging.console = False
  return c


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  """A demo workdir with its synthetic data, frozen weights and a complete float32 cache."""
  root = tmp_path_factory.mktemp("feature_cache")
  config = load_config()
  summary = cache_lib.run(config, str(root / "run"), out=str(root / "cache"), splits=None,
                          dtype="float32", shard_images=SHARD_IMAGES, batch_per_device=1)
  init = initial_parameters(config, workdir_lib.Workdir(str(root / "run")), build_mesh(config))
  return dict(root=root, workdir=str(root / "run"), out=str(root / "cache"), config=config, summary=summary,
              data_dir=str(workdir_lib.Workdir(str(root / "run")).data_dir(config)), init=init, jitted={})


def _frozen(built):
  """The frozen weights the cache was built from (restored from the run's WORKDIR/frozen)."""
  return built["init"]


def test_record_round_trip():
  rng = np.random.default_rng(0)
  arrays = {"sam_embeddings": rng.standard_normal((4, 4, 3)).astype(ml_dtypes.bfloat16),
            "eva_features": rng.standard_normal((5, 2)).astype(np.float32)}
  key, digest, back = feat.decode_record(feat.encode_record("synthetic/7", "ab12", arrays))
  assert (key, digest) == ("synthetic/7", "ab12")
  for name, value in arrays.items():
    assert back[name].dtype == value.dtype and back[name].shape == value.shape
    np.testing.assert_array_equal(back[name], value)


def test_build_covers_every_image_once(built):
  s = built["summary"]
  manifest = json.loads((Path(built["out"]) / feat.MANIFEST).read_text())
  keys = [k for shard in manifest["shards"] for k in shard["keys"]]
  assert manifest["complete"] and len(keys) == len(set(keys)) == s["images"] == s["computed"]
  assert manifest["depends_on"]["towers"] == ["eva", "sam"] and manifest["depends_on"]["dtype"] == "float32"
  # Every image of both splits is there, under its source/id.
  expected = set()
  for split in ("train", "val"):
    src = workdir_lib.open_split(built["data_dir"], split)
    for i in range(len(src)):
      raw = src[i]
      expected |= {feat.image_key(raw["source"].decode(), i_.decode()) for i_ in raw["images"]["id"]}
  assert set(keys) == expected
  assert s["shards"] == -(-len(keys) // SHARD_IMAGES)
  cfg = built["config"].model
  g = cfg.sam.image_size // cfg.sam.patch_size
  assert manifest["shapes"] == {"sam_embeddings": [g, g, cfg.sam.out_channels],
                                "eva_features": [1 + (cfg.vision.image_size // cfg.vision.patch_size) ** 2,
                                                 cfg.vision.width]}


def test_killed_build_resumes_without_recomputing_and_writes_identical_shards(built, tmp_path):
  config, frozen = built["config"], _frozen(built).frozen
  out = tmp_path / "resumed"
  kw = dict(splits=("train", "val"), towers=("eva", "sam"), dtype="float32", shard_images=SHARD_IMAGES,
            batch_per_device=1)
  first = cache_lib.build(config, frozen, built["data_dir"], out, stop_after_shards=2, **kw)
  assert not first["complete"] and first["shards_written"] == 2
  assert not json.loads((out / feat.MANIFEST).read_text())["complete"]
  with pytest.raises(ValueError, match="build is not finished"):
    feat.FeatureCache.open(out)
  (out / ".shard-00005.array_record.tmp-123").write_bytes(b"half a shard")  # what a kill -9 leaves
  second = cache_lib.build(config, frozen, built["data_dir"], out, **kw)
  assert second["complete"] and second["shards_done_before"] == 2
  done_images = 2 * SHARD_IMAGES
  assert second["computed"] == built["summary"]["images"] - done_images
  for i in range(built["summary"]["shards"]):
    name = feat.shard_name(i)
    assert (out / name).read_bytes() == (Path(built["out"]) / name).read_bytes(), name
  # A third run has nothing left to do.
  assert cache_lib.build(config, frozen, built["data_dir"], out, **kw)["computed"] == 0


def test_other_settings_never_mix_into_a_started_cache(built):
  config, frozen = built["config"], _frozen(built).frozen
  with pytest.raises(ValueError, match="other data or settings|does not match"):
    cache_lib.build(config, frozen, built["data_dir"], built["out"], splits=("train", "val"),
                    towers=("eva", "sam"), dtype="bfloat16", shard_images=SHARD_IMAGES)
  with pytest.raises(ValueError, match="eva_augment"):
    augmenting = load_config(eva_augment=True)
    cache_lib.build(augmenting, frozen, built["data_dir"], built["out"], splits=("val",), towers=("eva",))


def _batches(config, data_dir, cache=None, split="val"):
  src = workdir_lib.open_split(data_dir, split)
  d = config.data
  ds = make_dataset(src, cfg=config.model, tokenizers=workdir_lib.load_tokenizers(config, data_dir),
                    batch_size=4, train=False, seed=0, max_length=d.max_length,
                    max_question_length=d.max_question_length, num_epochs=1, feature_cache=cache)
  return list(ds)


def _loss_and_grads(built, batch):
  """(loss, gradients of the trainable parameters) of one batch, eval mode (one jitted function per
  module: a batch structure compiles once)."""
  init, loss_cfg = built["init"], built["config"].model.loss
  if "loss" not in built["jitted"]:
    def loss_fn(p, frozen, batch):
      return prima_loss(init.parts.merge(p, frozen, train=False)(batch), batch, loss_cfg)[0]
    built["jitted"]["loss"] = jax.jit(jax.value_and_grad(loss_fn))
  return built["jitted"]["loss"](init.params, init.frozen, batch)


def test_step_from_the_cache_equals_the_online_step(built):
  """Tiny model, float32: loss and every gradient from cached features equal the online step's.

  The cached features are the same tower functions on the same uint8 inputs, compiled in another
  program, so they may differ by float32 rounding only. Bounds: loss rtol 1e-5; every gradient leaf
  rtol 1e-4 / atol 1e-6, and max |difference| / max |gradient| < 1e-4 per leaf (measured: loss
  bit-equal, gradients 2e-6; with the examples' features exchanged: 0.33).
  """
  config = copy.deepcopy(built["config"])
  config.data.feature_cache = built["out"]
  init = _frozen(built)
  cache = data_lib.open_feature_cache(config, init.frozen)
  assert cache.towers == ("eva", "sam")
  online = _batches(config, built["data_dir"])
  cached = _batches(config, built["data_dir"], cache)
  assert len(online) == len(cached) >= 2
  a, b = online[0], cached[0]
  assert {"eva_images", "sam_images"} <= set(a) and not {"eva_images", "sam_images"} & set(b)
  assert a["eva_images"].dtype == np.uint8 and a["gt_masks"].dtype == np.uint8
  assert b["seg_valid"].any()
  for k in ("input_ids", "gt_masks", "sam_sizes", "seg_image_index"):
    np.testing.assert_array_equal(a[k], b[k])
  la, ga = _loss_and_grads(built, a)
  lb, gb = _loss_and_grads(built, b)
  print(f"loss online {float(la)!r} cached {float(lb)!r}")
  np.testing.assert_allclose(float(lb), float(la), rtol=1e-5)
  assert worst_relative_difference(ga, gb) < 1e-4
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(ga), jax.tree_util.tree_leaves(gb)):
    np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-4, atol=1e-6,
                               err_msg=jax.tree_util.keystr(path))
  # The comparison is sensitive to the features: the same batch with the examples' cached features
  # exchanged (a cache keyed wrongly) moves the gradients far beyond the bound.
  swapped = dict(b, **{k: np.roll(b[k], 1, axis=0) for k in ("eva_features", "sam_embeddings")})
  _, gs = _loss_and_grads(built, swapped)
  assert worst_relative_difference(ga, gs) > 1e-2


def test_bfloat16_cache_stays_close(built, tmp_path):
  """bfloat16 storage (the default) rounds the features to 8 significant bits: at tiny size the loss
  moves by under 0.1 %, the gradient as a whole by under 2 % (L2) and no leaf by more than 15 % of its
  largest entry (a leaf behind a ReLU moves most: SAM's decoder MLP, 8.8 % of its largest entry with
  0.7 % for the whole gradient, from the demo's pretrained image side)."""
  config, init = built["config"], _frozen(built)
  out = tmp_path / "bf16"
  cache_lib.build(config, init.frozen, built["data_dir"], out, splits=("val",), towers=("eva", "sam"),
                  dtype="bfloat16", shard_images=64)
  cache = feat.FeatureCache.open(out)
  assert cache.dtype == ml_dtypes.bfloat16
  online, cached = _batches(config, built["data_dir"])[0], _batches(config, built["data_dir"], cache)[0]
  assert cached["sam_embeddings"].dtype == ml_dtypes.bfloat16
  la, ga = _loss_and_grads(built, online)
  lb, gb = _loss_and_grads(built, cached)
  print(f"loss online {float(la)!r} bfloat16 cache {float(lb)!r}")
  assert abs(float(lb) - float(la)) < 1e-3 * abs(float(la))
  worst = worst_relative_difference(ga, gb)
  assert 1e-6 < worst < 0.15  # the rounding is visible, and small
  squared = lambda tree: sum(float(np.sum(np.square(np.asarray(x, np.float64))))
                             for x in jax.tree.leaves(tree))
  difference = jax.tree.map(lambda x, y: np.asarray(x) - np.asarray(y), ga, gb)
  assert np.sqrt(squared(difference) / squared(ga)) < 2e-2


def test_images_missing_from_the_cache_are_counted_and_dropped(built, tmp_path):
  config, init = built["config"], _frozen(built)
  out = tmp_path / "val_only"
  cache_lib.build(config, init.frozen, built["data_dir"], out, splits=("val",), towers=("sam",),
                  dtype="float32", shard_images=64)
  cache = feat.FeatureCache.open(out)
  val = workdir_lib.open_split(built["data_dir"], "val")
  train = workdir_lib.open_split(built["data_dir"], "train")
  val_keys = {feat.image_key(val[i]["source"].decode(), x.decode()) for i in range(len(val))
              for x in val[i]["images"]["id"]}
  mixed = [val[0], val[1], train[0], val[2]]
  unseen = {feat.image_key(train[0]["source"].decode(), x.decode()) for x in train[0]["images"]["id"]}
  assert unseen - val_keys, "the synthetic splits share no image"
  d = config.data
  toks = workdir_lib.load_tokenizers(config, built["data_dir"])
  ds = make_dataset(mixed, cfg=config.model, tokenizers=toks, batch_size=4, train=False, seed=0,
                    max_length=d.max_length, max_question_length=d.max_question_length, num_epochs=1,
                    feature_cache=cache)
  it = iter(ds)
  batch = next(it)
  assert it.drops.counts["missing_features"] == 1 and it.drops.total == 1
  assert not batch["seg_valid"][2].any() and batch["seg_valid"][[0, 1, 3]].any(1).all()
  assert "eva_images" in batch and "sam_embeddings" in batch and "sam_images" not in batch


def test_cache_that_does_not_match_the_model_is_refused(built):
  config, init = built["config"], _frozen(built)
  other = jax.tree.map(lambda x: x, init.frozen)
  w = other["sam"]["image_encoder"]["patch_embed"]["kernel"]
  other["sam"]["image_encoder"]["patch_embed"]["kernel"] = w + 1e-3
  config = load_config(feature_cache=built["out"])
  with pytest.raises(ConfigError, match="frozen weights differ"):
    data_lib.open_feature_cache(config, other)
  wrong = load_config(feature_cache=built["out"])
  wrong.model.sam.out_channels = 8
  wrong.model.sam.prompt_embed_dim = 8
  with pytest.raises(ConfigError, match="sam.out_channels"):
    data_lib.open_feature_cache(wrong, init.frozen)
  layout = load_config(feature_cache=built["out"])
  layout.model.scan_layers = not layout.model.scan_layers
  with pytest.raises(ConfigError, match="model.scan_layers"):
    data_lib.open_feature_cache(layout, init.frozen)
  with pytest.raises(ConfigError, match="eva_augment"):
    data_lib.open_feature_cache(load_config(feature_cache=built["out"], eva_augment=True), init.frozen)
  trained = dict(init.frozen)
  del trained["vision"]
  with pytest.raises(ConfigError, match="eva tower .* is not frozen"):
    data_lib.open_feature_cache(config, trained)
  with pytest.raises(ConfigError, match="no manifest.json"):
    data_lib.open_feature_cache(load_config(feature_cache=str(built["root"])), init.frozen)


def test_training_from_the_cache(built, tmp_path):
  """The demo recipe with frozen towers trains from the cache; the eval overlays still get pixels."""
  config = load_config(feature_cache=built["out"], data_dir=built["data_dir"])
  wd = tmp_path / "run"
  # The cache was computed from the frozen weights of the built run: start from the same ones.
  shutil.copytree(Path(built["workdir"]) / "frozen", wd / "frozen")
  summary = train_and_evaluate(config, str(wd))
  assert summary["cached_towers"] == ["eva", "sam"] and summary["final_step"] == config.train.num_steps
  assert summary["drops"]["missing_features"] == 0
  step, metrics = summary["evals"][-1]
  assert np.isfinite(metrics["loss"]) and metrics["masks"] > 0
  assert list((wd / "predictions" / f"step_{step}").glob("*.png"))


def test_cli_fails_in_one_line_on_a_trained_tower(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "prima_jax.data.cache", "--config=configs/demo.py:test",
       f"--workdir={tmp_path / 'run'}", "--config.data.eva_augment=False", "--towers=sam"],
      cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 2, proc.stderr[-2000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("error: ") and "sam tower (sam/image_encoder) is not frozen" in last
  assert not (tmp_path / "run").exists()   # refused before anything was generated or written


def test_display_pixels_stay_on_the_host(built):
  config, init = built["config"], _frozen(built)
  cache = feat.FeatureCache.open(built["out"], towers=("sam",))
  d = config.data
  ds = make_dataset(workdir_lib.open_split(built["data_dir"], "val"), cfg=config.model,
                    tokenizers=workdir_lib.load_tokenizers(config, built["data_dir"]), batch_size=4,
                    train=False, seed=0, max_length=d.max_length, max_question_length=d.max_question_length,
                    num_epochs=1, feature_cache=cache, display=True)
  batch = next(iter(ds))
  online = _batches(config, built["data_dir"])[0]
  np.testing.assert_array_equal(batch[DISPLAY_KEY], online["sam_images"])
  del init
  assert jnp.asarray(batch["sam_embeddings"]).shape[:2] == online["sam_images"].shape[:2]


def test_cache_on_an_object_store(built, object_store, tmp_path):
  """Built into gs:// (shards uploaded whole), read through a local copy: the same features."""
  config, init = built["config"], _frozen(built)
  url = "gs://bucket/features"
  kw = dict(splits=("val",), towers=("sam",), dtype="float32", shard_images=64)
  cache_lib.build(config, init.frozen, built["data_dir"], url, **kw)
  cache_lib.build(config, init.frozen, built["data_dir"], tmp_path / "local", **kw)
  remote = feat.FeatureCache.open(url, local_dir=tmp_path / "copy")
  local = feat.FeatureCache.open(tmp_path / "local")
  assert list((tmp_path / "copy").glob("shard-*.array_record")) and len(remote) == len(local) > 0
  for i, key in enumerate(sorted(local._index)):  # noqa: SLF001
    if i % 5 == 0:
      np.testing.assert_array_equal(remote.get(key)["sam_embeddings"], local.get(key)["sam_embeddings"])
