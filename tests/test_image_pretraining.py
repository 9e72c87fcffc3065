"""Image-side pretraining and its probe: the labels against the pixels and pycocotools, the baseline against
a recount, the command end to end, one error line for a missing benchmark, and a run that starts from the
pretrained image side (and, resumed, keeps it)."""

import functools
import importlib.util
import json
from pathlib import Path

import jax
import numpy as np
import pytest
import transformers
from etils import epath
from flax import nnx
from PIL import Image
from pycocotools.coco import COCO

from prima_jax import cli
from prima_jax import workdir as workdir_lib
from prima_jax.data import synthetic
from prima_jax.data.prompt import encode_question
from prima_jax.models.prima import Prima
from prima_jax.tools import vision_probe
from prima_jax.training import image_pretraining
from prima_jax.training import loop as loop_lib
from prima_jax.training.validate import ConfigError, check_image_pretraining

from parity_utils import test_seed

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
  out = tmp_path_factory.mktemp("bench")
  synthetic.generate(out, seed=3, sizes={"train": 24, "val": 8}, image_size=48)
  return out


def _coco(bench, split) -> COCO:
  return COCO(str(bench / "synthetic" / "annotations" / f"synthetic_{split}.json"))


def _expected_labels(pixels: np.ndarray, anns: list[dict], coco: COCO) -> set[str]:
  """An image's labels recounted from its pixels and the masks pycocotools rasterises: an object's colour
  is the palette colour most of its mask's pixels have, its centre that of its mask's bounding box."""
  height, width = pixels.shape[:2]
  palette = np.asarray(list(synthetic.COLORS.values()), np.int32)
  objects = []
  for a in anns:
    name = coco.cats[a["category_id"]]["name"]
    if name not in synthetic.CLASSES:
      continue
    mask = coco.annToMask(a).astype(bool)
    inside = pixels[mask].astype(np.int32)
    votes = [(inside == rgb).all(-1).sum() for rgb in palette]
    colour = list(synthetic.COLORS)[int(np.argmax(votes))]
    ys, xs = np.nonzero(mask)
    centre = ((xs.min() + xs.max() + 1) / 2 / width, (ys.min() + ys.max() + 1) / 2 / height)
    objects.append((colour, name, *centre))
  out = {f"colour:{c}" for c, *_ in objects} | {f"class:{k}" for _, k, *_ in objects}
  out |= {f"colour_class:{c} {k}" for c, k, *_ in objects}
  for k in synthetic.CLASSES:
    n = sum(o[1] == k for o in objects)
    out |= {f"count:{k}>={m}" for m in (2, 3) if n >= m}
  out |= {f"side:{k} left" for _, k, x, _ in objects if x < 0.5}
  out |= {f"side:{k} top" for _, k, _, y in objects if y < 0.5}
  return out


def test_labels_are_what_the_pixels_and_the_masks_pycocotools_draws_show(bench):
  image_lists, labels, questions = image_pretraining.split_labels(epath.Path(bench), "val")
  coco = _coco(bench, "val")
  records = json.loads((bench / "Part_Segm" / "synthetic_val.json").read_text())
  assert [len(x) for x in image_lists] == [len(r["img_ids"]) for r in records]
  assert questions == [r["q"] for r in records]
  checked, seen = 0, np.zeros(len(image_pretraining.LABELS))
  for record, names in zip(records, image_lists):
    for image_id, name in zip(record["img_ids"], names):
      assert coco.imgs[image_id]["file_name"] == name
      pixels = np.asarray(Image.open(bench / "synthetic" / "images" / name).convert("RGB"))
      anns = coco.loadAnns(coco.getAnnIds(imgIds=[image_id]))
      got = {image_pretraining.LABELS[i] for i in np.nonzero(labels[name] > 0.5)[0]}
      assert got == _expected_labels(pixels, anns, coco), name
      # Colours also straight from the pixels: the palette colours anywhere in the image.
      shown = {f"colour:{c}" for c, rgb in synthetic.COLORS.items()
               if (pixels == np.asarray(rgb, np.uint8)).all(-1).any()}
      assert {x for x in got if x.startswith("colour:")} == shown, name
      seen += labels[name]
      checked += 1
  assert checked == sum(len(r["img_ids"]) for r in records) >= 16
  for group in ("colour", "class", "side"):   # the fixture exercises every kind of label
    assert seen[image_pretraining.GROUPS[group]].sum() > 0, group
  assert seen[image_pretraining.GROUPS["count"]].sum() > 0


def test_score_against_a_recount():
  rng = np.random.default_rng(0)
  n = len(image_pretraining.LABELS)
  targets = (rng.random((5, 3, n)) < 0.3).astype(np.float32)
  valid = np.ones((5, 3), bool)
  valid[4, 1:] = False
  logits = rng.normal(size=(5, 3, n))
  majority = rng.random(n) < 0.5
  got = image_pretraining.score(logits, targets, valid, majority)
  rows = [(i, j) for i in range(5) for j in range(3) if valid[i, j]]
  right = np.array([[(logits[i, j, k] > 0) == (targets[i, j, k] == 1) for k in range(n)] for i, j in rows])
  base = np.array([[majority[k] == (targets[i, j, k] == 1) for k in range(n)] for i, j in rows])
  for group, labels in image_pretraining.LABEL_GROUPS.items():
    cols = [image_pretraining.LABELS.index(label) for label in labels]
    assert got[f"{group}_acc"] == pytest.approx(right[:, cols].sum() / (len(cols) * len(rows)))
    assert got[f"{group}_majority"] == pytest.approx(base[:, cols].sum() / (len(cols) * len(rows)))
    assert got[f"{group}_exact"] == pytest.approx(np.mean([r[cols].all() for r in right]))
  assert got["all_right"] == pytest.approx(np.mean([r.all() for r in right]))


def test_the_q_former_reads_each_record_s_question_as_bert_tokenises_it(bench, tmp_path):
  """load_split's question ids against transformers' BertTokenizer on the same vocab.txt ([CLS] q [SEP],
  truncated from the left as InstructBLIP's processor does), padded and masked to the longest."""
  _, qformer_tok = workdir_lib.load_tokenizers(_demo_test_config(tmp_path), None, fallback_dir=str(tmp_path))
  reference = transformers.BertTokenizer(str(tmp_path / workdir_lib.TOKENIZERS / "vocab.txt"),
                                         do_lower_case=True, truncation_side="left")
  length = 12  # some questions are longer: truncation is exercised
  encode = functools.partial(encode_question, qformer_tok, max_question_length=length)
  split = image_pretraining.load_split(epath.Path(bench), "train", 48, 5, encode)
  records = json.loads((bench / "Part_Segm" / "synthetic_train.json").read_text())
  expected = [reference(r["q"], truncation=True, max_length=length)["input_ids"] for r in records]
  assert any(len(reference(r["q"])["input_ids"]) > length for r in records)
  assert split.question_ids.shape == (len(records), max(map(len, expected)))
  for r, ids in enumerate(expected):
    assert split.question_ids[r][split.question_mask[r]].tolist() == ids, records[r]["q"]
    assert split.question_mask[r].tolist() == [k < len(ids) for k in range(split.question_mask.shape[1])]
  # Without an encoder: one masked position, the image side reads no text.
  bare = image_pretraining.load_split(epath.Path(bench), "val", 48, 5)
  assert bare.question_ids.shape[1] == 1 and not bare.question_mask.any()
  # A hidden question (all masked, as --noquestions trains) is no text at all; a read one changes the tokens.
  c = _demo_test_config(tmp_path)
  c.model.qformer.vocab_size = qformer_tok.vocab_size
  probe = image_pretraining.Probe(c.model, "image_tokens", seed=0)
  rows = slice(0, 4)
  inputs = (split.eva_images[rows], split.image_valid[rows])
  none = np.asarray(probe(*inputs, bare.question_ids[:4], bare.question_mask[:4]))
  hidden = np.asarray(probe(*inputs, split.question_ids[rows], np.zeros_like(split.question_mask[rows])))
  read = np.asarray(probe(*inputs, split.question_ids[rows], split.question_mask[rows]))
  np.testing.assert_allclose(hidden, none, rtol=0, atol=1e-5)
  assert np.abs(read - none).max() > 1e-3


def test_command_trains_and_reports_against_the_majority_baseline(bench, capsys):
  rc = cli.call(vision_probe, ["--config=configs/demo.py", f"--data_dir={bench}", "--steps=40", "--evals=2",
                               "--batch_size=4", "--learning_rate=3e-3", "--json"])
  assert rc == 0
  result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  train, val = _coco(bench, "train"), _coco(bench, "val")
  # An image shown with several questions counts each time.
  shown = {split: [k for r in json.loads((bench / "Part_Segm" / f"synthetic_{split}.json").read_text())
                   for k in r["img_ids"]] for split in ("train", "val")}
  assert result["images"] == {split: len(ids) for split, ids in shown.items()}
  assert result["questions"] == {"train": True, "val": True}  # the Q-Former reads them, as in training
  assert [e["step"] for e in result["evals"]] == [20, 40]
  # The majority baseline, recounted with pycocotools: each label's more frequent value on train, on val.
  def presence(coco, image_ids):
    rows = []
    for image_id in image_ids:
      anns = coco.loadAnns(coco.getAnnIds(imgIds=[image_id]))
      objects = [a for a in anns if coco.cats[a["category_id"]]["name"] in synthetic.CLASSES]
      colours = {tuple(a["color"]) for a in objects}
      classes = {coco.cats[a["category_id"]]["name"] for a in objects}
      rows.append([tuple(rgb) in colours for rgb in synthetic.COLORS.values()]
                  + [c in classes for c in synthetic.CLASSES])
    return np.asarray(rows)
  majority = presence(train, shown["train"]).mean(0) > 0.5
  val_rows = presence(val, shown["val"])
  last = result["evals"][-1]
  assert last["colour_majority"] == pytest.approx((val_rows[:, :6] == majority[:6]).mean())
  assert last["class_majority"] == pytest.approx((val_rows[:, 6:] == majority[6:]).mean())
  for e in result["evals"]:
    assert all(0.0 <= e[k] <= 1.0 for k in ("colour_acc", "class_acc", "all_right"))
  # The read-out learns: the second half's mean loss is below the first half's.
  assert result["evals"][1]["loss"] < result["evals"][0]["loss"]


def test_missing_benchmark_is_one_error_line(tmp_path, capsys):
  rc = cli.call(vision_probe, ["--config=configs/demo.py", f"--data_dir={tmp_path}", "--steps=1"])
  assert rc == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: ") and "synthetic_train.json" in err[0]


def _demo_test_config(data_dir):
  spec = importlib.util.spec_from_file_location("cfg_demo", ROOT / "configs" / "demo.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config("test")
  c.data.data_dir = str(data_dir)
  c.logging.console = False
  c.mesh.update(data=4, fsdp=1, tensor=2)  # 8 fake devices (conftest.py); the test batch of 4 on 4 shards
  c.eval.every = 0
  c.train.update(num_steps=1)
  c.train.image_pretraining.update(steps=3, batch_size=4)
  return c


def test_the_probe_s_steps_are_adam_on_the_masked_bce(bench):
  """run_probe's loop (jax.jit over the split probe and its nnx.Optimizer, the image side handed back)
  against a plain one: optax.adam on the pure parameters of the same freshly built probe, the loss taken
  through nnx.merge, the same rows drawn from the same seed (draw_rows: checked on its own below)."""
  import optax  # noqa: PLC0415
  c = _demo_test_config(bench)
  steps, batch_size, lr = 4, 3, 3e-3
  train = image_pretraining.load_split(epath.Path(bench), "train", c.model.vision.image_size,
                                       c.model.prima.max_images)
  counts = train.image_valid.sum(1)

  def image_counts_drawn(seed):
    rng = np.random.default_rng(seed)
    return {image_pretraining.draw_rows(rng, counts, batch_size)[1] for _ in range(steps)}

  # A seed whose steps all draw one image count: each loop compiles its step once.
  seed = next(s for s in range(1000) if len(image_counts_drawn(s)) == 1)
  summary, trained = image_pretraining.run_probe(c.model, epath.Path(bench), steps=steps,
                                                 batch_size=batch_size, learning_rate=lr, evals=2, seed=seed,
                                                 report=lambda line: None)
  fresh = image_pretraining.Probe(c.model, image_pretraining.THROUGH[0], seed=seed)
  graphdef, params, rest = nnx.split(fresh, nnx.Param, ...)
  init = image_pretraining.flatten(params.to_pure_dict())  # jax arrays: the loop below makes new ones
  tx = optax.adam(lr)
  opt_state = tx.init(params)

  def loss_fn(params, images, targets, valid, question_ids, question_mask):
    return image_pretraining.masked_bce(nnx.merge(graphdef, params, rest)(
        images, valid, question_ids, question_mask), targets, valid)

  grad_fn = jax.jit(jax.value_and_grad(loss_fn))
  rng, losses = np.random.default_rng(seed), []
  for _ in range(steps):
    rows, k = image_pretraining.draw_rows(rng, train.image_valid.sum(1), batch_size)
    loss, grads = grad_fn(params, train.eva_images[rows, :k], train.labels[rows, :k],
                          train.image_valid[rows, :k], train.question_ids[rows], train.question_mask[rows])
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    losses.append(float(loss))
  # Each report's loss is the mean over the steps since the previous one.
  np.testing.assert_allclose([e["loss"] for e in summary["evals"]],
                             [np.mean(losses[:2]), np.mean(losses[2:])], rtol=1e-5)
  expected = image_pretraining.flatten(params.to_pure_dict())
  assert set(trained) == {p.removeprefix("prima/") for p in expected
                          if p.startswith("prima/") and p.split("/")[1] in image_pretraining.IMAGE_SIDE}
  # An attention key bias shifts every logit of a query alike, so softmax makes its gradient zero: what is
  # left is rounding noise, which Adam scales to full-size steps. Every other parameter is compared; 1e-5
  # is ~1/300 of one step (lr 3e-3), a write-back or step skipped moves parameters by whole steps.
  compared = [p for p in trained if not p.endswith(("key/bias", "k_proj/bias"))]
  assert len(compared) > 0.9 * len(trained)
  for path in compared:
    np.testing.assert_allclose(np.asarray(trained[path]), np.asarray(expected["prima/" + path]), rtol=0,
                               atol=1e-5, err_msg=path)
  moved = {p.split("/")[0] for p in trained if not np.array_equal(np.asarray(init["prima/" + p]),
                                                                  np.asarray(trained[p]))}
  assert moved == set(image_pretraining.IMAGE_SIDE)


def test_draw_rows_gives_each_record_its_uniform_share_in_batches_of_one_image_count():
  """Every batch holds records of one image count k, cut to k slots; over many draws each record is
  drawn as often as uniform draws from all records would (the counts' spread is the binomial's)."""
  counts = np.array([2] * 50 + [3] * 30 + [4] * 15 + [5] * 5)
  rng = np.random.default_rng(test_seed())
  draws, batch_size, seen = 20000, 8, np.zeros(len(counts))
  ks = []
  for _ in range(draws):
    rows, k = image_pretraining.draw_rows(rng, counts, batch_size)
    assert rows.shape == (batch_size,) and (counts[rows] == k).all()
    np.add.at(seen, rows, 1)
    ks.append(k)
  expected = draws * batch_size / len(counts)          # 1600 per record
  assert np.abs(seen - expected).max() < 5 * np.sqrt(expected)
  # k is drawn in proportion to the records showing it (not 1 in 4 each).
  shares = np.bincount(ks, minlength=6)[2:] / draws
  np.testing.assert_allclose(shares, [0.5, 0.3, 0.15, 0.05], atol=0.02)


def test_a_fresh_run_starts_from_the_pretrained_image_side_and_a_resumed_one_keeps_it(tmp_path, monkeypatch):
  c = _demo_test_config(tmp_path / "data")
  assert c.train.trainable == ("llm/", "seg_head/", "sam/")  # the demo freezes the pretrained image side
  first = loop_lib.train_and_evaluate(c, str(tmp_path / "w"))
  frozen = image_pretraining.flatten(jax.tree.map(np.asarray, first["frozen"]))
  # The reference: the same pretraining run by itself (same seed, the run's own data and vocabulary).
  tokenizers = workdir_lib.load_tokenizers(c, tmp_path / "data")
  workdir_lib.fit_vocab_sizes(c, tokenizers, announce=False)
  # The Q-Former reads each record's question through the run's tokenizer, as in training.
  encode = functools.partial(encode_question, tokenizers[1], max_question_length=c.data.max_question_length)
  _, trained = image_pretraining.run_probe(c.model, epath.Path(tmp_path / "data" / "source"), steps=3,
                                           batch_size=4,
                                           learning_rate=c.train.image_pretraining.learning_rate,
                                           evals=1, seed=c.seed, encode_question=encode,
                                           report=lambda line: None)
  assert {p.split("/", 1)[0] for p in trained} == set(image_pretraining.IMAGE_SIDE)
  for path, value in trained.items():
    np.testing.assert_allclose(frozen[path], np.asarray(value), rtol=0, atol=1e-6, err_msg=path)
  init = image_pretraining.flatten(nnx.state(Prima(c.model, rngs=nnx.Rngs(c.seed)), nnx.Param).to_pure_dict())
  changed = [p for p in trained if not np.array_equal(np.asarray(init[p]), frozen[p])]
  assert any(p.startswith("vision/") for p in changed) and any(p.startswith("qformer/") for p in changed)

  # Resumed: the frozen image side comes back from WORKDIR/frozen; pretraining does not run again.
  def fail(*args, **kwargs):
    raise AssertionError("image pretraining ran on a resumed run")
  monkeypatch.setattr(image_pretraining, "pretrain", fail)
  c.train.num_steps = 2
  second = loop_lib.train_and_evaluate(c, str(tmp_path / "w"))
  assert second["start_step"] == 1 and second["final_step"] == 2
  again = image_pretraining.flatten(jax.tree.map(np.asarray, second["frozen"]))
  for path in trained:
    np.testing.assert_array_equal(again[path], frozen[path], err_msg=path)


def test_pretraining_needs_the_standard_synthetic_benchmark():
  c = _demo_test_config("/nonexistent")
  check_image_pretraining(c)
  c.data.kind = "tfds"
  with pytest.raises(ConfigError, match=r"train.image_pretraining.steps=3 needs the standard synthetic"):
    check_image_pretraining(c)
  c.train.image_pretraining.steps = 0
  check_image_pretraining(c)
