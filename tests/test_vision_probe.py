"""The image-side probe: its labels against the pixels and pycocotools, its baseline against a recount, the
command end to end, and one error line for a missing benchmark."""

import json

import numpy as np
import pytest
from etils import epath
from PIL import Image
from pycocotools.coco import COCO

from prima_jax import cli
from prima_jax.data import synthetic
from prima_jax.tools import vision_probe

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
  out = tmp_path_factory.mktemp("bench")
  synthetic.generate(out, seed=3, sizes={"train": 24, "val": 8}, image_size=48)
  return out


def _coco(bench, split) -> COCO:
  return COCO(str(bench / "synthetic" / "annotations" / f"synthetic_{split}.json"))


def test_labels_are_the_colours_in_the_pixels_and_the_classes_pycocotools_lists(bench):
  image_lists, labels = vision_probe.split_labels(epath.Path(bench), "val")
  coco = _coco(bench, "val")
  records = json.loads((bench / "Part_Segm" / "synthetic_val.json").read_text())
  assert [len(x) for x in image_lists] == [len(r["img_ids"]) for r in records]
  checked = 0
  for record, names in zip(records, image_lists):
    for image_id, name in zip(record["img_ids"], names):
      assert coco.imgs[image_id]["file_name"] == name
      pixels = np.asarray(Image.open(bench / "synthetic" / "images" / name).convert("RGB"))
      shown = [bool((pixels == np.asarray(rgb, np.uint8)).all(-1).any()) for rgb in synthetic.COLORS.values()]
      anns = coco.loadAnns(coco.getAnnIds(imgIds=[image_id]))
      classes = {coco.cats[a["category_id"]]["name"] for a in anns}
      expected = [c in classes for c in synthetic.CLASSES]
      np.testing.assert_array_equal(labels[name] > 0.5, np.asarray(shown + expected), err_msg=name)
      checked += 1
  assert checked == sum(len(r["img_ids"]) for r in records) >= 16


def test_score_against_a_recount():
  rng = np.random.default_rng(0)
  targets = (rng.random((5, 3, 12)) < 0.3).astype(np.float32)
  valid = np.ones((5, 3), bool)
  valid[4, 1:] = False
  logits = rng.normal(size=(5, 3, 12))
  majority = rng.random(12) < 0.5
  got = vision_probe.score(logits, targets, valid, majority)
  rows = [(i, j) for i in range(5) for j in range(3) if valid[i, j]]
  right = np.array([[(logits[i, j, k] > 0) == (targets[i, j, k] == 1) for k in range(12)] for i, j in rows])
  base = np.array([[majority[k] == (targets[i, j, k] == 1) for k in range(12)] for i, j in rows])
  assert got["colour_acc"] == pytest.approx(right[:, :6].sum() / (6 * len(rows)))
  assert got["class_acc"] == pytest.approx(right[:, 6:].sum() / (6 * len(rows)))
  assert got["colour_majority"] == pytest.approx(base[:, :6].sum() / (6 * len(rows)))
  assert got["class_majority"] == pytest.approx(base[:, 6:].sum() / (6 * len(rows)))
  assert got["all_right"] == pytest.approx(np.mean([r.all() for r in right]))


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
