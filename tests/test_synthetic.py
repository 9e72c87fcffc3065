"""The synthetic M⁴Seg-format benchmark: determinism, records, masks, categories, multi-image share."""

import json
import os
import re
import time

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from prima_jax import cli
from prima_jax.data import synthetic

# pycocotools 2.0.11 `decode` under numpy 2 warns once per call; it is not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")

SIZES = {"train": 60, "val": 12, "test": 12}
RECORD_KEYS = {"dataset_name", "img_ids", "q", "a", "groundings", "category"}
IMAGE_REF = re.compile(r"Image (\d)|the (first|second|third|fourth|fifth) image")


def _decode(segm, height, width) -> np.ndarray:
  """The original loader's ``segm_to_mask``: polygon list | uncompressed RLE | compressed RLE -> bool mask."""
  if isinstance(segm, list):
    rle = mask_utils.merge(mask_utils.frPyObjects(segm, height, width))
  elif isinstance(segm["counts"], list):
    assert list(segm["size"]) == [height, width]
    rle = mask_utils.frPyObjects(segm, height, width)
  else:
    assert isinstance(segm["counts"], str)
    assert list(segm["size"]) == [height, width]
    rle = segm
  return mask_utils.decode(rle).astype(bool)


def _kind(segm) -> str:
  if isinstance(segm, list):
    return "polygon"
  return "rle" if isinstance(segm["counts"], list) else "compressed_rle"


def _files(root: str) -> dict[str, bytes]:
  out = {}
  for d, _, names in os.walk(root):
    for n in names:
      path = os.path.join(d, n)
      with open(path, "rb") as f:
        out[os.path.relpath(path, root)] = f.read()
  return out


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("synthetic"))
  summary = synthetic.generate(out, seed=7, sizes=SIZES, image_size=96)
  return out, summary


def _load(out: str, split: str):
  with open(os.path.join(out, "Part_Segm", f"synthetic_{split}.json")) as f:
    records = json.load(f)
  with open(os.path.join(out, "synthetic", "annotations", f"synthetic_{split}.json")) as f:
    coco = json.load(f)
  return records, coco


def check_record(i: int, rec: dict, coco: dict) -> dict[str, int]:
  """Asserts the structure of one record against its COCO file, as the original loader reads it.

  Returns counts: groundings by encoding, parts, repeated mentions.
  """
  where = f"record {i}"
  images = {im["id"]: im for im in coco["images"]}
  anns = {a["id"]: a for a in coco["annotations"]}
  cats = {c["id"]: c["name"] for c in coco["categories"]}
  assert set(rec) == RECORD_KEYS, where
  assert rec["dataset_name"] == "synthetic"
  assert rec["category"] in synthetic.CATEGORIES
  n = len(rec["img_ids"])
  assert 2 <= n <= 5, where
  assert all(k in images for k in rec["img_ids"]), where
  assert set(rec["groundings"]) == {f"img_{k + 1}" for k in range(n)}, where
  assert not synthetic.TAG_PATTERN.search(rec["q"]), f"{where}: tag in the question"
  sizes = [(images[k]["height"], images[k]["width"]) for k in rec["img_ids"]]
  used = [0] * n
  seen: dict[str, np.ndarray] = {}
  counts = {"repeated": 0, "parts": 0}
  for m in synthetic.TAG_PATTERN.finditer(rec["a"]):
    tag = m.group()
    name, code = tag.rsplit("_", 1)
    x = int(code[0])
    assert 1 <= x <= n, f"{where}: {tag} names image {x} of {n}"
    if tag in seen:
      counts["repeated"] += 1
      continue
    assert used[x - 1] < len(rec["groundings"][f"img_{x}"]), f"{where}: no grounding left for {tag}"
    g = rec["groundings"][f"img_{x}"][used[x - 1]]
    used[x - 1] += 1
    h, w = sizes[x - 1]
    mask = _decode(g["segmentation"], h, w)
    assert mask.shape == (h, w) and mask.any(), f"{where}: {tag} mask empty"
    counts[_kind(g["segmentation"])] = counts.get(_kind(g["segmentation"]), 0) + 1
    assert g["name"] == name, f"{where}: {tag} grounded as {g['name']!r}"
    # Instance YY is the YY-th object of its class from the left (by bounding-box centre) in its image;
    # part ZZ the ZZ-th part annotation of it.
    image_id = rec["img_ids"][x - 1]
    cls = name if len(code) == 3 else synthetic.PART_OWNER[name]
    objects = sorted((a for a in coco["annotations"] if a["image_id"] == image_id
                      and a["obj_ann_id"] == a["id"] and cats[a["category_id"]] == cls),
                     key=lambda a: a["bbox"][0] + a["bbox"][2] / 2)
    assert int(code[1:3]) <= len(objects), f"{where}: {tag} names a missing instance"
    obj = objects[int(code[1:3]) - 1]
    obj_mask = _decode(obj["segmentation"], h, w)
    if len(code) == 3:
      assert "obj_ann_id" not in g
      assert cats[obj["category_id"]] == name, f"{where}: {tag} is a {cats[obj['category_id']]}"
      assert np.array_equal(obj_mask, mask), f"{where}: {tag} mask is not its annotation's"
    else:
      counts["parts"] += 1
      assert g["obj_ann_id"] == obj["id"], f"{where}: {tag} obj_ann_id {g['obj_ann_id']} != {obj['id']}"
      assert cats[anns[g["obj_ann_id"]]["category_id"]] == synthetic.PART_OWNER[name], where
      parts = [a for a in coco["annotations"] if a["obj_ann_id"] == obj["id"] and a["id"] != obj["id"]]
      part = parts[int(code[3:]) - 1]
      assert cats[part["category_id"]] == f"{synthetic.PART_OWNER[name]}:{name}", where
      assert np.array_equal(_decode(part["segmentation"], h, w), mask), f"{where}: {tag} mask mismatch"
      assert not (mask & ~obj_mask).any(), f"{where}: {tag} leaves its object"
    seen[tag] = mask
  for k in range(n):
    assert used[k] == len(rec["groundings"][f"img_{k + 1}"]), f"{where}: unused groundings in img_{k + 1}"
  assert seen, f"{where}: no grounded mention"
  return counts


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
  sizes = {"train": 10, "val": 4}
  a, b, c = (str(tmp_path / n) for n in "abc")
  synthetic.generate(a, seed=3, sizes=sizes)
  synthetic.generate(b, seed=3, sizes=sizes)
  synthetic.generate(c, seed=4, sizes=sizes)
  fa, fb, fc = _files(a), _files(b), _files(c)
  assert len(fa) > 20
  assert fa == fb
  assert fa.keys() != fc.keys() or any(fa[k] != fc[k] for k in fa)
  rec_a = fa[os.path.join("Part_Segm", "synthetic_train.json")]
  assert rec_a != fc[os.path.join("Part_Segm", "synthetic_train.json")]


def test_layout_and_coco_file(dataset):
  out, summary = dataset
  for split, n in SIZES.items():
    records, coco = _load(out, split)
    assert len(records) == n == summary["splits"][split]["examples"]
    assert {"images", "annotations", "categories"} <= set(coco)
    ids = [im["id"] for im in coco["images"]]
    assert len(set(ids)) == len(ids)
    for im in coco["images"][:20]:
      with Image.open(os.path.join(out, "synthetic", "images", im["file_name"])) as img:
        assert img.size == (im["width"], im["height"]) and img.mode == "RGB"
    for a in coco["annotations"]:
      assert a["image_id"] in set(ids) and a["area"] > 0 and len(a["bbox"]) == 4
  # Image files of different splits never collide.
  all_ids = [im["id"] for s in SIZES for im in _load(out, s)[1]["images"]]
  assert len(set(all_ids)) == len(all_ids)


def test_every_record_is_well_formed(dataset):
  out, _ = dataset
  totals: dict[str, int] = {}
  for split in SIZES:
    records, coco = _load(out, split)
    for i, rec in enumerate(records):
      for k, v in check_record(i, rec, coco).items():
        totals[k] = totals.get(k, 0) + v
  assert all(totals.get(k, 0) > 0 for k in synthetic.ENCODINGS), totals
  assert totals["parts"] > 0 and totals["repeated"] > 0, totals


def test_masks_agree_with_rendered_pixels(dataset):
  out, _ = dataset
  _, coco = _load(out, "val")
  by_image: dict[int, list[dict]] = {}
  for a in coco["annotations"]:
    by_image.setdefault(a["image_id"], []).append(a)
  palette = {tuple(c) for c in synthetic.COLORS.values()}
  for im in coco["images"]:
    pixels = np.asarray(Image.open(os.path.join(out, "synthetic", "images", im["file_name"])).convert("RGB"))
    h, w = im["height"], im["width"]
    anns = by_image[im["id"]]
    covered = np.zeros((h, w), bool)
    for obj in (a for a in anns if a["obj_ann_id"] == a["id"]):
      obj_mask = _decode(obj["segmentation"], h, w)
      assert not (obj_mask & covered).any(), "objects overlap"
      covered |= obj_mask
      rest = obj_mask.copy()
      for part in (a for a in anns if a["obj_ann_id"] == obj["id"] and a["id"] != obj["id"]):
        part_mask = _decode(part["segmentation"], h, w)
        assert part_mask.any() and not (part_mask & ~obj_mask).any()
        assert (pixels[part_mask] == part["color"]).all()
        rest &= ~part_mask
      assert rest.any() and (pixels[rest] == obj["color"]).all()
    background = {tuple(p) for p in pixels[~covered].reshape(-1, 3)}
    assert len(background) == 1 and not background & palette


def test_categories_and_multi_image_share():
  data = synthetic.make_split(0, "train", 400)
  cats = {m.category for m in data.metas}
  assert cats == set(synthetic.CATEGORIES)
  assert all(r["category"] == m.category for r, m in zip(data.records, data.metas))
  multi = [m.needs_multi for m in data.metas]
  assert sum(multi) / len(multi) >= 0.5
  for i, (rec, meta) in enumerate(zip(data.records, data.metas)):
    grounded = {int(m.group().rsplit("_", 1)[1][0]) - 1 for m in synthetic.TAG_PATTERN.finditer(rec["a"])}
    assert grounded <= meta.evidence, f"record {i} grounds an image outside its evidence"
    refs = {int(a) - 1 if a else synthetic.ORDINALS.index(b) for a, b in IMAGE_REF.findall(rec["q"])}
    scope_all = re.search(r"these images|all the images|every image|which image", rec["q"], re.I)
    if meta.needs_multi:
      # Independent of the flag: the question spans several images, or the answer grounds several.
      assert len(grounded) > 1 or len(refs) > 1 or scope_all, f"record {i}: {rec['q']!r}"
    else:
      assert len(meta.evidence) == 1 and refs == set(meta.evidence) and not scope_all, f"record {i}"


def test_vocabulary_covers_every_question_and_answer():
  vocab = synthetic.vocabulary()
  assert vocab == sorted(set(vocab)) == synthetic.vocabulary()
  data = synthetic.make_split(1, "val", 400)
  words = {w for r in data.records for t in (r["q"], r["a"]) for w in synthetic.WORD_PATTERN.findall(t)}
  assert words - set(vocab) == set()
  assert {"IMAGE", "SEG", "_", "<", ">", "/", "[", "]", "(", ")"} <= set(vocab)


def test_tag_grammar_is_the_original_loaders():
  assert synthetic.parse_tag("cup_102") == ("cup", 1, 2, None)
  assert synthetic.parse_tag("gift_box_301") == ("gift_box", 3, 1, None)
  assert synthetic.parse_tag("handle_10201") == ("handle", 1, 2, 1)
  for bad in ("cup_12", "cup_1021", "cup"):
    with pytest.raises(ValueError, match="not an instance tag"):
      synthetic.parse_tag(bad)
  text = "Grip the handle_10201 of the red cup_102; the cup_102 can hold liquid."
  assert [m.group() for m in synthetic.TAG_PATTERN.finditer(text)] == ["handle_10201", "cup_102", "cup_102"]


def test_generation_speed(tmp_path):
  t0 = time.perf_counter()
  summary = synthetic.generate(str(tmp_path), seed=0, sizes={"train": 300})
  dt = time.perf_counter() - t0
  print(f"\nsynthetic: 300 examples ({summary['splits']['train']['images']} images) in {dt:.2f} s "
        f"= {300 / dt:.0f} examples/s")
  assert summary["splits"]["train"]["examples"] == 300


def test_cli_and_bad_arguments(tmp_path, capsys):
  cli.call(synthetic, ["--out", str(tmp_path), "--seed", "2", "--train", "3", "--val", "2", "--test", "0"])
  assert "train: 3 examples" in capsys.readouterr().out
  records, _ = _load(str(tmp_path), "test")
  assert records == []
  with pytest.raises(ValueError, match="unknown split"):
    synthetic.generate(str(tmp_path), sizes={"dev": 3})
  with pytest.raises(ValueError, match="n_examples"):
    synthetic.make_split(0, "train", -1)
  assert cli.call(synthetic, ["--out", str(tmp_path), "--train", "-2"]) == 2
  assert capsys.readouterr().err == "error: --train must be >= 0\n"


def test_generate_writes_the_same_bytes_to_an_object_store(tmp_path, object_store):
  sizes = {"train": 4, "val": 2}
  summary = synthetic.generate(object_store.url("syn"), seed=3, sizes=sizes, image_size=48)
  synthetic.generate(str(tmp_path / "local"), seed=3, sizes=sizes, image_size=48)
  remote = _files(str(object_store.local(object_store.url("syn"))))
  assert len(remote) > 10 and remote == _files(str(tmp_path / "local"))
  assert summary["out_dir"] == object_store.url("syn")
  assert summary["splits"]["val"]["records_file"] == f"{object_store.url('syn')}/Part_Segm/synthetic_val.json"


def test_cli_url_without_its_client_is_a_usage_error(monkeypatch, capsys):
  from prima_jax import paths
  monkeypatch.setattr(paths, "missing_clients", lambda scheme: ["gcsfs"])
  assert cli.call(synthetic, ["--out", "gs://bucket/syn", "--train", "1"]) == 2
  assert "error: --out=gs://bucket/syn: gs:// needs gcsfs" in capsys.readouterr().err
