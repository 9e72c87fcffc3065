"""The synthetic M⁴Seg-format benchmark: determinism, records, masks, categories, multi-image share; the
many-image variant, its config's budgets, and its preparation into a workdir."""

import hashlib
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
# The loader's grammar written out: from 10 images on, also 4 (object) and 6 (part) digits, XX = image.
WIDE_TAG = re.compile(r"\b(\w+)_(\d{3,6})\b")


def read_tags(text: str, n: int):
  """(tag, name, image, instance, part or None) of each tag in a record of ``n`` images."""
  for m in (WIDE_TAG if n >= 10 else synthetic.TAG_PATTERN).finditer(text):
    name, code = m.group().rsplit("_", 1)
    x = 2 if len(code) in (4, 6) else 1
    yield m.group(), name, int(code[:x]), int(code[x:x + 2]), int(code[x + 2:]) if len(code) > x + 2 else None


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


def check_record(i: int, rec: dict, coco: dict, image_range: tuple[int, int] = (2, 5)) -> dict[str, int]:
  """Asserts the structure of one record against its COCO file, as the original loader reads it (with
  two-digit image indices from 10 images on); ``image_range``: the allowed image count.

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
  assert image_range[0] <= n <= image_range[1], where
  assert all(k in images for k in rec["img_ids"]), where
  assert set(rec["groundings"]) == {f"img_{k + 1}" for k in range(n)}, where
  assert not synthetic.TAG_PATTERN.search(rec["q"]), f"{where}: tag in the question"
  sizes = [(images[k]["height"], images[k]["width"]) for k in rec["img_ids"]]
  used = [0] * n
  seen: dict[str, np.ndarray] = {}
  counts = {"repeated": 0, "parts": 0}
  for tag, name, x, yy, zz in read_tags(rec["a"], n):
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
    cls = name if zz is None else synthetic.PART_OWNER[name]
    objects = sorted((a for a in coco["annotations"] if a["image_id"] == image_id
                      and a["obj_ann_id"] == a["id"] and cats[a["category_id"]] == cls),
                     key=lambda a: a["bbox"][0] + a["bbox"][2] / 2)
    assert yy <= len(objects), f"{where}: {tag} names a missing instance"
    obj = objects[yy - 1]
    obj_mask = _decode(obj["segmentation"], h, w)
    if zz is None:
      assert "obj_ann_id" not in g
      assert cats[obj["category_id"]] == name, f"{where}: {tag} is a {cats[obj['category_id']]}"
      assert np.array_equal(obj_mask, mask), f"{where}: {tag} mask is not its annotation's"
    else:
      counts["parts"] += 1
      assert g["obj_ann_id"] == obj["id"], f"{where}: {tag} obj_ann_id {g['obj_ann_id']} != {obj['id']}"
      assert cats[anns[g["obj_ann_id"]]["category_id"]] == synthetic.PART_OWNER[name], where
      parts = [a for a in coco["annotations"] if a["obj_ann_id"] == obj["id"] and a["id"] != obj["id"]]
      part = parts[zz - 1]
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
  records = synthetic.make_split(1, "val", 400).records
  records += synthetic.make_split(1, "val", 100, 48, variant="many").records
  words = {w for r in records for t in (r["q"], r["a"]) for w in synthetic.WORD_PATTERN.findall(t)}
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
  # From 10 images on, two-digit image indices: 4 digits (object), 6 digits (part).
  assert synthetic.parse_tag("cup_1021", 12) == ("cup", 10, 21, None)
  assert synthetic.parse_tag("handle_640201", 64) == ("handle", 64, 2, 1)
  assert synthetic.parse_tag("cup_102", 64) == ("cup", 1, 2, None)
  for bad in ("cup_12", "cup_1234567"):
    with pytest.raises(ValueError, match="not an instance tag"):
      synthetic.parse_tag(bad, 64)


def test_standard_benchmark_and_vocabulary_unchanged():
  """Digests of the standard benchmark (records, COCO file, pixels) and the vocabulary, taken before the
  many-image variant was added: the standard data and tokeniser keep their bytes and ids."""
  def digest(seed, split, n, image_size):
    data = synthetic.make_split(seed, split, n, image_size)
    h = hashlib.sha256()
    h.update(json.dumps(data.records, sort_keys=True).encode())
    h.update(json.dumps(data.coco, sort_keys=True).encode())
    for img in data.images:
      h.update(repr((img.image_id, img.pixels.shape)).encode())
      h.update(img.pixels.tobytes())
    return h.hexdigest()

  assert digest(5, "train", 8, 48) == "f9365ac1d2e9117ef2faf26cc6fc60bf758f2f9b33599a3737e7f8fca8f9d24d"
  assert digest(5, "val", 4, 96) == "65293e64cea9122e9bf5739f67581356f154489d6016fe34a8126e779fadccb4"
  vocab = synthetic.vocabulary()
  assert len(vocab) == 280
  assert hashlib.sha256("\n".join(vocab).encode()).hexdigest() == (
      "43eb622350c791c59be8e78b2cb415d3a02fd3ceef3e6a84c073c23422bb68e6")


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


# ----------------------------------------------------------------------------------------------------
# The many-image variant

MANY_SIZES = {"train": 24, "val": 6}
DISPLAY = {display: cls for cls, (display, _, _) in synthetic.CLASSES.items()}
PLURAL = {plural: cls for cls, (_, plural, _) in synthetic.CLASSES.items()}
USES = {answer: classes for _, answer, classes in synthetic.PROPERTIES.values()}
FIND_Q = re.compile(r"(?:Which images show|In which images is there) an? (\w+) ([\w ]+)\?")
USE_Q = re.compile(r"Which images show something that ([\w ]+)\?")
COUNT_Q = re.compile(r"How many ([\w ]+) are there (?:across all the images|in all the images together)\?")
MORE_Q = re.compile(r"Which image has more ([\w ]+), Image (\d+) or Image (\d+)\?")
SIDE_Q = re.compile(r"Is the (\w+) ([\w ]+) on the same side in Image (\d+) and Image (\d+)\?")


@pytest.fixture(scope="module")
def many(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("many"))
  return out, synthetic.generate(out, seed=3, sizes=MANY_SIZES, image_size=48, variant="many")


def test_many_records_are_well_formed_and_sparse(many):
  from prima_jax.data import records as records_lib
  out, summary = many
  assert summary["variant"] == "many" and summary["images"] == synthetic.MANY_IMAGES == (8, 64)
  wide = 0
  for split, n in MANY_SIZES.items():
    records, coco = _load(out, split)
    assert len(records) == n == summary["splits"][split]["examples"]
    assert "variant many" in coco["info"]["description"]
    objects = {im["id"]: 0 for im in coco["images"]}
    for a in coco["annotations"]:
      objects[a["image_id"]] += a["obj_ann_id"] == a["id"]
    assert max(objects.values()) <= 2 and min(objects.values()) == 0
    for i, rec in enumerate(records):
      check_record(i, rec, coco, synthetic.MANY_IMAGES)
      grounded = {t for t, *_ in read_tags(rec["a"], len(rec["img_ids"]))}
      assert 1 <= len(grounded) <= synthetic.MANY_MAX_GROUNDINGS, f"{split} record {i}: {rec['a']}"
      wide += any(len(t.rsplit("_", 1)[1]) in (4, 6) for t in grounded)
      # The loader reads them as written: no problem at 64 images, one per [SEG].
      assert records_lib.validate_record(rec, i, max_images=64) == []
      answer, mentions = records_lib.convert_answer(rec["a"], rec["groundings"], len(rec["img_ids"]))
      assert answer.count("[SEG]") == len(mentions) == len(grounded)
  assert wide > 0


def _instances(scene, k, cls, color=None):
  return {(i.cls, i.number) for i in scene[k].instances if i.cls == cls and color in (None, i.color_name)}


def test_many_answers_are_right_about_every_image():
  """Each kind of question, parsed from its text, against the drawn scene: the named images and the
  grounded instances are exactly the ones the question asks for."""
  data = synthetic.make_split(2, "val", 120, 48, variant="many")
  assert {r["category"] for r in data.records} == set(synthetic.CATEGORIES)
  by_id = {img.image_id: img for img in data.images}
  kinds = set()
  for i, rec in enumerate(data.records):
    scene = [by_id[k] for k in rec["img_ids"]]
    n, q, a = len(scene), rec["q"], rec["a"]
    where = f"record {i}: {q} | {a}"
    grounded: dict[int, set] = {}
    for _, name, x, yy, _ in read_tags(a, n):
      grounded.setdefault(x - 1, set()).add((name, yy))
    if m := FIND_Q.fullmatch(q):
      kinds.add("find")
      want = {k: s for k in range(n) if (s := _instances(scene, k, DISPLAY[m.group(2)], m.group(1)))}
      assert 1 <= len(want) <= 4 and grounded == want, where
      assert {int(v) - 1 for v in re.findall(r"Image (\d+)", a)} == set(want), where
    elif m := USE_Q.fullmatch(q):
      kinds.add("use")
      classes = USES[m.group(1)]
      want = {k: s for k in range(n) if (s := set().union(*(_instances(scene, k, c) for c in classes)))}
      assert 1 <= len(want) <= 4 and grounded == want, where
      assert {int(v) - 1 for v in re.findall(r"Image (\d+)", a)} == set(want), where
    elif m := COUNT_Q.fullmatch(q):
      kinds.add("count")
      want = {k: s for k in range(n) if (s := _instances(scene, k, PLURAL[m.group(1)]))}
      total = sum(map(len, want.values()))
      assert grounded == want and 1 <= total <= synthetic.MANY_MAX_GROUNDINGS, where
      assert a.startswith(f"There are {total} " if total > 1 else "There is 1 "), where
    elif m := MORE_Q.fullmatch(q):
      kinds.add("more")
      cls, x, y = PLURAL[m.group(1)], int(m.group(2)) - 1, int(m.group(3)) - 1
      assert abs(x - y) >= n // 2, where
      have = {k: _instances(scene, k, cls) for k in (x, y)}
      assert len(have[x]) != len(have[y]), where
      more = max(have, key=lambda k: len(have[k]))
      assert a.startswith(f"Image {more + 1} has more "), where
      assert grounded == {k: s for k, s in have.items() if s}, where
    elif m := SIDE_Q.fullmatch(q):
      kinds.add("side")
      color, cls, x, y = m.group(1), DISPLAY[m.group(2)], int(m.group(3)) - 1, int(m.group(4)) - 1
      assert abs(x - y) >= n // 2, where
      sides = []
      for k in (x, y):
        (inst,) = [j for j in scene[k].instances if (j.cls, j.color_name) == (cls, color)]
        sides.append("left" if inst.center[0] < scene[k].width / 2 else "right")
        assert grounded[k] == {(cls, inst.number)}, where
      assert a.startswith("Yes" if sides[0] == sides[1] else "No"), where
    else:
      pytest.fail(f"unknown question kind: {where}")
  assert kinds == {"find", "use", "count", "more", "side"}


def test_many_is_deterministic_and_its_range_configurable(tmp_path):
  sizes = {"train": 3}
  a, b, c = (str(tmp_path / n) for n in "abc")
  synthetic.generate(a, seed=1, sizes=sizes, image_size=48, variant="many", images=(10, 12))
  synthetic.generate(b, seed=1, sizes=sizes, image_size=48, variant="many", images=(10, 12))
  synthetic.generate(c, seed=1, sizes=sizes, image_size=48, variant="many", images=(13, 13))
  assert _files(a) == _files(b)
  for out, (lo, hi) in ((a, (10, 12)), (c, (13, 13))):
    records, _ = _load(out, "train")
    assert all(lo <= len(r["img_ids"]) <= hi for r in records)
  for variant, images, message in (("many", (1, 8), "2 <= min <= max <= 99"),
                                   ("many", (9, 100), "2 <= min <= max <= 99"),
                                   ("many", (8,), "expected"), ("standard", (8, 64), "variant='many'"),
                                   ("lots", None, "variant must be one of")):
    with pytest.raises(ValueError, match=re.escape(message)):
      synthetic.make_split(0, "train", 1, variant=variant, images=images)


def test_many_cli_flags(tmp_path, capsys):
  out = str(tmp_path / "m")
  assert cli.call(synthetic, ["--out", out, "--variant", "many", "--images", "10,11", "--train", "2",
                              "--val", "0", "--test", "0"]) == 0
  assert "train: 2 examples" in capsys.readouterr().out
  records, coco = _load(out, "train")
  assert all(10 <= len(r["img_ids"]) <= 11 for r in records) and "10-11 images" in coco["info"]["description"]
  for argv, message in ((["--variant", "many", "--images", "1,70"], "error: --images=1,70: expected MIN,MAX"),
                        (["--images", "8,64"], "error: --images applies to --variant=many only")):
    assert cli.call(synthetic, ["--out", out, *argv]) == 2
    assert capsys.readouterr().err.startswith(message)


@pytest.mark.parametrize("arg", ["many", "test,many"])
def test_many_config_budgets_hold_the_longest_example(arg, tmp_path):
  """data.max_length, prima.max_images / max_masks and the question budget of ``configs/demo.py:many``
  against the longest tokenised examples of a generated split at the most images the config draws."""
  from configs.demo import get_config
  from prima_jax.data import prompt
  from prima_jax.data import records as records_lib
  from prima_jax.data.tokenizer import build_synthetic_tokenizers

  c = get_config(arg)
  d, model = c.data, c.model
  lo, hi = d.synthetic_images
  assert d.synthetic_variant == "many" and model.prima.max_images == hi
  assert d.max_length <= model.llm.max_position_embeddings
  llm, bert = build_synthetic_tokenizers(synthetic.vocabulary(), tmp_path,
                                         first_added_id=model.prima.first_added_id)
  data = synthetic.make_split(d.synthetic_seed, "train", 100, d.synthetic_image_size, variant="many",
                              images=(hi, hi))
  longest, most_masks = 0, 0
  for rec in data.records:
    question = records_lib.convert_question(rec["q"], hi)
    answer, mentions = records_lib.convert_answer(rec["a"], rec["groundings"], hi)
    most_masks = max(most_masks, len(mentions))
    enc = prompt.encode_example(llm, bert, question, answer, hi,
                                num_query_tokens=model.qformer.num_query_tokens,
                                image_token_id=model.prima.image_token_id, max_length=d.max_length,
                                max_question_length=d.max_question_length,
                                system=prompt.system_prompt(model))  # PromptTooLong if over
    longest = max(longest, len(enc["input_ids"]))
    assert len(bert.encode(question)) + 2 <= d.max_question_length, question  # no question is cut
  slots = hi * (model.qformer.num_query_tokens + 2)
  print(f"\n{arg}: longest example {longest} tokens ({slots} image slots) of max_length {d.max_length}; "
        f"{most_masks} masks of max_masks {model.prima.max_masks}")
  assert slots < longest <= d.max_length
  assert longest > d.max_length - 128, "max_length is far above the longest example: lower it"
  assert most_masks <= model.prima.max_masks == synthetic.MANY_MAX_GROUNDINGS


def test_prepare_many_reads_through_the_pipeline_and_refuses_another_variant(tmp_path):
  """configs/demo.py:test,many prepared into a data directory -> the Grain pipeline; the directory then
  refuses the standard benchmark's config and vice versa."""
  from configs.demo import get_config
  from prima_jax import workdir as workdir_lib
  from prima_jax.data import m4seg, pipeline
  from prima_jax.models import batch as batch_lib

  c = get_config("test,many")
  directory = tmp_path / "data"
  workdir_lib.prepare_synthetic(c, directory)
  prepared = json.loads((directory / "PREPARED").read_text())
  assert prepared["variant"] == "many" and prepared["images"] == [10, 16]
  tokenizers = workdir_lib.load_tokenizers(c, directory)
  source = workdir_lib.open_split(directory, "val")
  assert len(source) == c.data.synthetic_sizes.val == 4
  ds = pipeline.make_dataset(source, cfg=c.model, tokenizers=tokenizers, batch_size=2, train=False, seed=0,
                             max_length=c.data.max_length, max_question_length=c.data.max_question_length,
                             num_epochs=1, shard_index=0, shard_count=1)
  it = iter(ds)
  batches = list(it)
  assert it.drops.total == 0 and len(batches) == 2
  for k, batch in enumerate(batches):
    batch_lib.validate_batch(batch, c.model, training=True)
    assert batch["eva_images"].shape[1] == c.model.prima.max_images == 16
    for b in range(2):
      ex = m4seg.decode_example(source[2 * k + b])  # eval without shuffle: stream order = source order
      m = len(ex.masks)
      assert 10 <= len(ex.images) == batch["image_valid"][b].sum() <= 16
      assert 1 <= m == batch["seg_valid"][b].sum() <= c.model.prima.max_masks
      np.testing.assert_array_equal(batch["seg_image_index"][b, :m], ex.mask_image)
  records_file = directory / "source" / "Part_Segm" / "synthetic_train.json"
  before = records_file.read_bytes()
  workdir_lib.prepare_synthetic(c, directory)  # the same settings: used as prepared
  standard = get_config("test")
  with pytest.raises(workdir_lib.SyntheticDataMismatch, match=re.escape(
      "holds the 'many' (10-16 images) synthetic benchmark, the config asks for the 'standard' one")):
    workdir_lib.prepare_synthetic(standard, directory)
  wider = get_config("test,many").unlock()
  wider.data.synthetic_images = (10, 20)
  with pytest.raises(workdir_lib.SyntheticDataMismatch, match=re.escape("for the 'many' (10-20 images)")):
    workdir_lib.prepare_synthetic(wider, directory)
  wider.data.synthetic_variant = "lots"
  with pytest.raises(ValueError, match="data.synthetic_variant='lots'.*variant must be one of"):
    workdir_lib.prepare_synthetic(wider, directory)
  # A directory prepared before variants existed ("ok") holds the standard benchmark.
  (directory / "PREPARED").write_text("ok\n")
  with pytest.raises(workdir_lib.SyntheticDataMismatch, match="holds the 'standard' synthetic benchmark"):
    workdir_lib.prepare_synthetic(c, directory)
  workdir_lib.prepare_synthetic(standard, directory)
  assert records_file.read_bytes() == before  # nothing regenerated
  described = get_config("test").unlock()
  described.data.synthetic_describe_train = 0.5
  with pytest.raises(workdir_lib.SyntheticDataMismatch, match=re.escape(
      "holds the 'standard' synthetic benchmark, the config asks for the 'standard' with describe_train=0.5 "
      "one (data.synthetic_variant, data.synthetic_images, data.synthetic_describe_train)")):
    workdir_lib.prepare_synthetic(described, directory)
  workdir_lib.prepare_synthetic(described, directory, training=False)  # its val split is the same


def test_synthetic_cache_dir_names_the_variant():
  from configs.demo import get_config
  from prima_jax import workdir as workdir_lib

  def name(arg, **data):
    c = get_config(arg).unlock()
    c.data.update(cache_dir="/cache", **data)
    return workdir_lib.synthetic_cache_dir(c).name

  # The standard benchmark's directory keeps the name it had before variants existed.
  assert name(None) == "synthetic-3468aa33ff50" and name("test") == "synthetic-b48a18a847e0"
  described = name(None, synthetic_describe_train=0.5)
  assert described not in (name(None), name(None, synthetic_describe_train=0.25))
  many = name("many")
  assert many not in (name(None), name("many", synthetic_images=(8, 32)))
  assert name("many", synthetic_seed=1) != many


def test_describe_records_name_every_object_of_their_images(tmp_path, capsys):
  """``describe_train``: extra train records that name every object of their images (colour, class,
  left-to-right number) with its mask, recounted from the COCO file; the other records, the images and
  the val split keep their bytes."""
  plain, described = tmp_path / "plain", tmp_path / "described"
  synthetic.generate(str(plain), seed=3, sizes={"train": 40, "val": 8, "test": 0}, image_size=48)
  assert cli.call(synthetic, ["--out", str(described), "--seed", "3", "--train", "40", "--val", "8",
                              "--test", "0", "--image_size", "48", "--describe_train", "0.5"]) == 0
  printed = capsys.readouterr().out
  assert _files(str(plain / "synthetic")) == _files(str(described / "synthetic"))  # images, COCO files
  for name in ("synthetic_val.json",):
    assert (plain / "Part_Segm" / name).read_bytes() == (described / "Part_Segm" / name).read_bytes()
  base, _ = _load(str(plain), "train")
  records, coco = _load(str(described), "train")
  extra, rest = [], iter(base)
  pending = next(rest)
  for rec in records:  # the plain records, in order, with the extras between them
    if rec == pending:
      pending = next(rest, None)
    else:
      extra.append(rec)
  assert pending is None and len(records) == len(base) + len(extra)
  assert 8 <= len(extra) <= 24  # p = 0.5 of the ~27 scenes
  assert f"train: {len(records)} examples ({len(extra)} of them 'Describe these images.')" in printed
  colour_of = {tuple(rgb): c for c, rgb in synthetic.COLORS.items()}
  cats = {c["id"]: c["name"] for c in coco["categories"]}
  subsets = 0
  for i, rec in enumerate(extra):
    check_record(i, rec, coco)
    n = len(rec["img_ids"])
    described_images = [int(m.group(1)) for m in re.finditer(r"Image (\d) shows", rec["a"])]
    if rec["q"] == "Describe these images.":
      assert described_images == list(range(1, n + 1)), rec
    else:
      subsets += 1
      assert rec["q"] == "Describe " + synthetic._join([f"Image {k}" for k in described_images]) + ".", rec
    named = []
    for k in described_images:
      objects = sorted((a for a in coco["annotations"] if a["image_id"] == rec["img_ids"][k - 1]
                        and a["obj_ann_id"] == a["id"]),
                       key=lambda a: (a["bbox"][0] + a["bbox"][2] / 2, a["bbox"][1] + a["bbox"][3] / 2))
      number: dict[str, int] = {}
      for a in objects:
        cls = cats[a["category_id"]]
        number[cls] = number.get(cls, 0) + 1
        named.append(f"the {colour_of[tuple(a['color'])]} {cls}_{k}{number[cls]:02d}")
    assert re.findall(r"the \w+ [a-z_]+_\d{3}", rec["a"]) == named, rec
    assert len(named) <= synthetic.DESCRIBE_MAX_GROUNDINGS
  assert subsets >= 1  # scenes of more than 8 objects describe some of their images
  with pytest.raises(ValueError, match="describe must be a probability"):
    synthetic.make_split(0, "train", 4, describe=1.5)
  assert cli.call(synthetic, ["--out", str(tmp_path / "x"), "--describe_train", "2"]) == 2
  assert capsys.readouterr().err == ("error: --describe_train=2.0: expected a probability in [0, 1], "
                                     "standard variant only\n")
