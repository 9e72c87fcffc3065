"""M⁴Seg record format: loading, validation, answer conversion, mask decoding, image resolution."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from prima_jax.data import records as rec

# --------------------------------------------------------------------------------------------------
# A crafted dataset in the original loader's layout (shared with test_m4seg_builder.py).

PACO_SIZES = {1: (16, 20), 2: (18, 24), 3: (16, 20), 4: (16, 20), 5: (16, 20)}  # id -> (height, width)
ADE_SIZES = {11: (12, 14), 12: (15, 13), 13: (10, 16)}


def rect(h, w, top, left, bottom, right):
  m = np.zeros((h, w), bool)
  m[top:bottom, left:right] = True
  return m


def uncompressed_rle(mask):
  """bool [h, w] -> {"counts": [ints], "size": [h, w]} (column-major runs, zeros first)."""
  flat = mask.flatten(order="F").astype(np.int64)
  change = np.flatnonzero(np.diff(flat)) + 1
  bounds = np.concatenate([[0], change, [flat.size]])
  counts = np.diff(bounds).tolist()
  if flat[0]:
    counts = [0] + counts
  return {"counts": counts, "size": list(mask.shape)}


def compressed_rle(mask):
  out = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
  return {"counts": out["counts"].decode("ascii"), "size": list(mask.shape)}


def write_png(path: Path, hw, seed):
  path.parent.mkdir(parents=True, exist_ok=True)
  pixels = np.random.default_rng(seed).integers(0, 256, (*hw, 3), dtype=np.uint8)
  Image.fromarray(pixels).save(path)
  return pixels


def paco_record():
  """2 images: polygon object, compressed-RLE object, uncompressed-RLE part, a repeated mention."""
  return {
      "dataset_name": "paco_lvis",
      "img_ids": [1, "2"],
      "q": "Which object would you sit on, chair_101 or mug_201?",
      "a": "You would sit on the chair_101, not the mug_201. The chair_101 stands on its leg_10101.",
      "groundings": {
          "img_1": [
              {"segmentation": [[2, 2, 12, 2, 12, 10, 2, 10]], "name": "chair"},
              {"segmentation": uncompressed_rle(rect(16, 20, 10, 3, 15, 6)), "name": "leg",
               "obj_ann_id": 100},
          ],
          "img_2": [{"segmentation": compressed_rle(rect(18, 24, 4, 5, 12, 20)), "name": "mug"}],
      },
      "category": "functional",
  }


PACO_ANSWER = ("You would sit on the <p> chair_1 </p> [SEG] (IMAGE1), not the <p> mug_1 </p> [SEG] (IMAGE2). "
               "The <p> chair_1 </p> (IMAGE1) stands on its <p> chair_1's leg_1 </p> [SEG] (IMAGE1).")


def ade_record():
  """3 images (ADE20K, test split -> val annotations), a part resolved through obj_ann_id, two lamps."""
  return {
      "dataset_name": "ade20k_part234",
      "img_ids": [11, 12, 13],
      "q": "Which image has a bed_201?",
      "a": "IMAGE2 has the bed_201 with a pillow_20101, while the lamp_101 and the lamp_301 light the rooms.",
      "groundings": {
          "img_1": [{"segmentation": [[1, 1, 6, 1, 6, 7, 1, 7]], "name": "lamp"}],
          "img_2": [{"segmentation": compressed_rle(rect(15, 13, 5, 0, 15, 13)), "name": "bed"},
                    {"segmentation": [[2, 5, 8, 5, 8, 8, 2, 8]], "name": "pillow", "obj_ann_id": 500}],
          "img_3": [{"segmentation": [[0, 0, 4, 0, 4, 4], [8, 5, 15, 5, 15, 9, 8, 9]], "name": "lamp"}],
      },
  }


ADE_ANSWER = ("IMAGE2 has the <p> bed_1 </p> [SEG] (IMAGE2) with a <p> bed_1's pillow_1 </p> [SEG] (IMAGE2), "
              "while the <p> lamp_1 </p> [SEG] (IMAGE1) and the <p> lamp_1 </p> [SEG] (IMAGE3) "
              "light the rooms.")


def write_crafted(root: Path) -> dict:
  """Writes images, annotation files and record files; returns paths, roots and the written pixels."""
  part_segm = root / "Part_Segm"
  pixels = {}
  paco_images = []
  for image_id, hw in PACO_SIZES.items():
    name = f"train2017/{image_id:012d}.png"
    paco_images.append({"id": image_id, "file_name": name, "height": hw[0], "width": hw[1]})
    if image_id <= 2:
      pixels[("paco_lvis", image_id)] = write_png(root / "coco_2017" / name, hw, image_id)
  # id 3: listed, no file (missing); id 4: corrupt file; id 5: wrong size on disk.
  (root / "coco_2017/train2017/000000000004.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
  write_png(root / "coco_2017/train2017/000000000005.png", (7, 7), 5)
  paco = {"images": paco_images, "categories": [{"id": 7, "name": "chair"}, {"id": 8, "name": "mug"}],
          "annotations": [{"id": 100, "image_id": 1, "category_id": 7}]}
  (part_segm / "paco_lvis/annotations").mkdir(parents=True)
  (part_segm / "paco_lvis/annotations/paco_lvis_v1_train.json").write_text(json.dumps(paco))
  ade_images = []
  for image_id, hw in ADE_SIZES.items():
    name = f"ADE_val_{image_id:08d}.png"
    ade_images.append({"id": image_id, "file_name": name, "height": hw[0], "width": hw[1]})
    pixels[("ade20k_part234", image_id)] = write_png(
        part_segm / "ADE20KPart234/images/validation" / name, hw, image_id)
  ade = {"images": ade_images, "categories": [{"id": 3, "name": "bed"}],
         "annotations": [{"id": 500, "image_id": 12, "category_id": 3}]}
  (part_segm / "ADE20KPart234/ade20k_instance_val_mixed_parts.json").write_text(json.dumps(ade))
  train, test = part_segm / "crafted_train.json", part_segm / "crafted_test.json"
  train.write_text(json.dumps([paco_record()]))
  test.write_text(json.dumps([ade_record()]))
  return {"train": train, "test": test, "pixels": pixels,
          "roots": {"paco_lvis": str(part_segm / "paco_lvis"),
                    "ade20k_part234": str(part_segm / "ADE20KPart234")}}


def bad_records():
  """(record, expected skip reason), one per bad-input rule, all on the crafted paco source."""
  good = paco_record()

  def variant(**changes):
    r = json.loads(json.dumps(good))
    r.update(changes)
    return r

  def with_grounding(image, j, **changes):
    r = variant()
    r["groundings"][image][j].update(changes)
    return r

  six = variant(img_ids=[1, 2, 1, 2, 1, 2])
  return [
      (variant(img_ids=[3, 2]), rec.MISSING_IMAGE),
      (variant(img_ids=[4, 2]), rec.CORRUPT_IMAGE),
      (variant(img_ids=[999, 2]), rec.UNKNOWN_IMAGE_ID),
      (with_grounding("img_1", 0, segmentation=[[1, 2, 3, 4]]), rec.MALFORMED_SEGMENTATION),
      (with_grounding("img_1", 1, segmentation={"counts": [3, 4], "size": [16, 20]}),
       rec.MALFORMED_SEGMENTATION),
      (with_grounding("img_2", 0, segmentation={"counts": "!!bad", "size": [18, 24]}),
       rec.MALFORMED_SEGMENTATION),
      (with_grounding("img_2", 0, segmentation=compressed_rle(rect(10, 10, 0, 0, 5, 5))),
       rec.MALFORMED_SEGMENTATION),  # RLE of another size than the image
      (variant(a=good["a"] + " Also the chair_102."), rec.TAG_WITHOUT_GROUNDING),
      (six, rec.TOO_MANY_IMAGES),
      (variant(a="The chair_301."), rec.TAG_IMAGE_OUT_OF_RANGE),
      (variant(img_ids=[5, 2]), rec.IMAGE_SIZE_MISMATCH),
      ({k: v for k, v in good.items() if k != "a"}, rec.INVALID_RECORD),
  ]


@pytest.fixture
def crafted(tmp_path):
  return write_crafted(tmp_path)


def sources_for(crafted):
  from prima_jax.data.m4seg import Sources
  return Sources(crafted["roots"])


# --------------------------------------------------------------------------------------------------
# Tests


def pycoco(seg, h, w):
  if isinstance(seg, list):
    return mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(seg, h, w))).astype(bool)
  if isinstance(seg["counts"], list):
    return mask_utils.decode(mask_utils.frPyObjects(seg, h, w)).astype(bool)
  return mask_utils.decode({"counts": seg["counts"].encode(), "size": seg["size"]}).astype(bool)


def test_two_image_record_with_parts_and_both_rle_kinds(crafted):
  index, image_dir = sources_for(crafted).get("paco_lvis", "train")
  assert Path(image_dir).resolve() == (Path(crafted["train"]).parent.parent / "coco_2017").resolve()
  record = rec.load_records(crafted["train"])[0]
  ex = rec.record_to_example(record, 0, image_index=index, image_root=image_dir, split="train")
  assert ex.example_id == "paco_lvis/train/0" and ex.source == "paco_lvis" and ex.category == "functional"
  assert ex.question == "Which object would you sit on, chair or mug?"
  assert ex.answer == PACO_ANSWER
  assert ex.phrases == ["chair_1", "mug_1", "chair_1's leg_1"]
  assert ex.mask_image == [0, 1, 0]
  assert ex.image_ids == ["1", "2"]
  np.testing.assert_array_equal(ex.images[0], crafted["pixels"][("paco_lvis", 1)])
  np.testing.assert_array_equal(ex.images[1], crafted["pixels"][("paco_lvis", 2)])
  g = record["groundings"]
  for mask, seg, (h, w) in zip(ex.masks, [g["img_1"][0]["segmentation"], g["img_2"][0]["segmentation"],
                                          g["img_1"][1]["segmentation"]], [(16, 20), (18, 24), (16, 20)]):
    assert mask.dtype == bool and mask.shape == (h, w)
    np.testing.assert_array_equal(mask, pycoco(seg, h, w))
  # The RLE helpers above are right: the masks are the rectangles they encode.
  np.testing.assert_array_equal(ex.masks[1], rect(18, 24, 4, 5, 12, 20))
  np.testing.assert_array_equal(ex.masks[2], rect(16, 20, 10, 3, 15, 6))
  assert ex.masks[0][5, 5] and not ex.masks[0][12, 15]


def test_three_image_ade20k_test_split_reads_val(crafted):
  root = Path(crafted["roots"]["ade20k_part234"])
  assert not (root / "ade20k_instance_test_mixed_parts.json").exists()
  index, image_dir = sources_for(crafted).get("ade20k_part234", "test")
  assert index.path == str(root / "ade20k_instance_val_mixed_parts.json")
  assert Path(image_dir) == root / "images/validation"
  record = rec.load_records(crafted["test"])[0]
  ex = rec.record_to_example(record, 4, image_index=index, image_root=image_dir, split="test")
  assert ex.example_id == "ade20k_part234/test/4" and ex.category == ""
  assert ex.answer == ADE_ANSWER
  assert ex.question == "Which image has a bed?"
  assert ex.phrases == ["bed_1", "bed_1's pillow_1", "lamp_1", "lamp_1"]
  assert ex.mask_image == [1, 1, 0, 2]
  assert [im.shape for im in ex.images] == [(12, 14, 3), (15, 13, 3), (10, 16, 3)]
  g = record["groundings"]
  segs = [g["img_2"][0], g["img_2"][1], g["img_1"][0], g["img_3"][0]]
  for mask, seg, k in zip(ex.masks, segs, ex.mask_image):
    h, w = ex.images[k].shape[:2]
    np.testing.assert_array_equal(mask, pycoco(seg["segmentation"], h, w))
  assert ex.masks[3].sum() > 0 and ex.masks[3][:5, :5].any() and ex.masks[3][6:9, 9:15].any()  # 2 polygons


def test_source_layouts():
  root = Path("/data/Part_Segm/PASCAL-Part")
  assert rec.SOURCES["pascal_part"].paths(root, "val") == (root / "val.json",
                                                           root / "VOCdevkit/VOC2010/JPEGImages")
  paco = rec.SOURCES["paco_lvis"].paths(Path("/d/Part_Segm/paco_lvis"), "test")
  assert paco == (Path("/d/Part_Segm/paco_lvis/annotations/paco_lvis_v1_test.json"),
                  Path("/d/coco_2017"))
  ade = rec.SOURCES["ade20k_part234"]
  assert ade.paths(Path("/a"), "train") == (Path("/a/ade20k_instance_train_mixed_parts.json"),
                                            Path("/a/images/training"))
  assert ade.paths(Path("/a"), "val")[1] == Path("/a/images/validation")
  syn = rec.SOURCES["synthetic"].paths(Path("/s/synthetic"), "val")
  assert syn == (Path("/s/synthetic/annotations/synthetic_val.json"), Path("/s/synthetic/images"))


@pytest.mark.parametrize("kind", ["polygon", "uncompressed", "compressed_str", "compressed_bytes"])
def test_decode_segmentation_matches_pycocotools(kind):
  h, w = 9, 11
  mask = np.zeros((h, w), bool)
  mask[2:7, 3:5] = True
  mask[0, 10] = True
  if kind == "polygon":
    seg = [[1, 1, 8, 1.5, 6, 7], [9, 6, 10, 6, 10, 8, 9, 8]]
    expected = pycoco(seg, h, w)
  elif kind == "uncompressed":
    seg, expected = uncompressed_rle(mask), mask
  else:
    seg, expected = compressed_rle(mask), mask
    if kind == "compressed_bytes":
      seg["counts"] = seg["counts"].encode()
  out = rec.decode_segmentation(seg, h, w)
  assert out.dtype == bool and out.shape == (h, w) and out.any()
  np.testing.assert_array_equal(out, expected)
  if kind != "polygon":
    np.testing.assert_array_equal(out, pycoco(uncompressed_rle(mask), h, w))


@pytest.mark.parametrize("seg, message", [
    ([[1, 2, 3, 4]], "4 coordinates"),
    ([[1, 2, 3, 4, 5]], "5 coordinates"),
    ([], "empty polygon"),
    ([[1, 2, 3, "x", 5, 6]], "finite numbers"),
    ({"counts": [1, 2]}, "'counts' and 'size'"),
    ({"counts": [10, 20], "size": [5, 5]}, "cover 30 pixels"),
    ({"counts": [-1, 26], "size": [5, 5]}, "non-negative"),
    ({"counts": "!!", "size": [5, 5]}, "invalid character"),
    ({"counts": "0k", "size": [5, 5]}, "middle of a number"),
    ({"counts": "52", "size": [5, 5]}, "cover"),
    ({"counts": [25], "size": [4, 4]}, "differs from the image size"),
    ("polygon", "got str"),
])
def test_decode_segmentation_malformed(seg, message):
  with pytest.raises(ValueError, match="malformed segmentation") as info:
    rec.decode_segmentation(seg, 5, 5)
  assert message in str(info.value)


def test_convert_answer_only_tags_become_mentions():
  groundings = {"img_1": [{"segmentation": [], "name": "dining table"}],
                "img_2": [{"segmentation": [], "name": "cup"}, {"segmentation": [], "name": "handle"}]}
  answer, mentions = rec.convert_answer(
      "In IMAGE1 the dining_table_101 (year_2020) holds nothing; cup_201's handle_20101 and cup_201.",
      groundings, 2, object_name=lambda ann_id: None)
  assert answer == ("In IMAGE1 the <p> dining table_1 </p> [SEG] (IMAGE1) (year_2020) holds nothing; "
                    "<p> cup_1 </p> [SEG] (IMAGE2)'s <p> cup_1's handle_1 </p> [SEG] (IMAGE2) and "
                    "<p> cup_1 </p> (IMAGE2).")
  assert [(m.phrase, m.image) for m in mentions] == [("dining table_1", 0), ("cup_1", 1),
                                                     ("cup_1's handle_1", 1)]
  assert rec.convert_question("Is the dining_table_101 near cup_20101?") == "Is the dining_table near cup?"


def _wide_record():
  """12 images (ids 1, 2 repeated): tags of images 11 and 12 need the two-digit forms."""
  seg = {1: [[2, 2, 12, 2, 12, 10, 2, 10]], 2: compressed_rle(rect(18, 24, 4, 5, 12, 20))}
  return {
      "dataset_name": "paco_lvis",
      "img_ids": [1, 2] * 6,
      "q": "Is the cup_1102 bigger than mug_102?",
      # 4-digit object and 6-digit part (image 11), 3-digit object (image 1), the same instance of image 3
      # spelt both ways (one [SEG]), a 5-digit part in image 1, a 4-digit object in image 12.
      "a": "The cup_1102 with its handle_110201 beats the mug_102 and its lid_10201; cup_0301 is cup_301. "
           "The cup_1201 too.",
      "groundings": {
          "img_11": [{"segmentation": seg[1], "name": "cup"},
                     {"segmentation": uncompressed_rle(rect(16, 20, 10, 3, 15, 6)), "name": "handle"}],
          "img_1": [{"segmentation": seg[1], "name": "mug"},
                    {"segmentation": [[3, 3, 6, 3, 6, 6, 3, 6]], "name": "lid", "obj_name": "mug"}],
          "img_3": [{"segmentation": seg[1], "name": "cup"}],
          "img_12": [{"segmentation": seg[2], "name": "cup"}],
      },
  }


WIDE_ANSWER = ("The <p> cup_2 </p> [SEG] (IMAGE11) with its <p> cup_2's handle_1 </p> [SEG] (IMAGE11) "
               "beats the <p> mug_2 </p> [SEG] (IMAGE1) and its <p> mug_2's lid_1 </p> [SEG] (IMAGE1); "
               "<p> cup_1 </p> [SEG] (IMAGE3) is <p> cup_1 </p> (IMAGE3). "
               "The <p> cup_1 </p> [SEG] (IMAGE12) too.")


def test_two_digit_image_tags_from_ten_images():
  tags = rec.find_tags("cup_1102 handle_110201 mug_102 lid_10201 cup_0301 year_2020_x", 12)
  assert [(t.text, t.name, t.image, t.instance, t.part) for t in tags] == [
      ("cup_1102", "cup", 11, 2, None), ("handle_110201", "handle", 11, 2, 1), ("mug_102", "mug", 1, 2, None),
      ("lid_10201", "lid", 1, 2, 1), ("cup_0301", "cup", 3, 1, None)]
  assert rec.find_tags("cup_0301 cup_301", 12)[0].key == rec.find_tags("cup_0301 cup_301", 12)[1].key
  # Up to 9 images the grammar is the original's: 4- and 6-digit words are text.
  assert [t.text for t in rec.find_tags("cup_1102 handle_110201 mug_102 year_2020", 9)] == ["mug_102"]
  assert rec.convert_question("Is the cup_1102 near mug_102?", 12) == "Is the cup near mug?"
  assert rec.convert_question("Is the cup_1102 near mug_102?", 2) == "Is the cup_1102 near mug?"


def test_wide_record_converts_and_out_of_range_tags_are_skipped(crafted):
  record = _wide_record()
  assert rec.validate_record(record, 0, max_images=12) == []
  assert "12 images, more than max_images=5" in "\n".join(rec.validate_record(record, 0))
  index, image_dir = sources_for(crafted).get("paco_lvis", "train")
  ex = rec.record_to_example(record, 0, image_index=index, image_root=image_dir, max_images=12)
  assert ex.question == "Is the cup bigger than mug?"
  assert ex.answer == WIDE_ANSWER
  assert ex.mask_image == [10, 10, 0, 0, 2, 11]
  assert [m.shape for m in ex.masks] == [(16, 20)] * 5 + [(18, 24)]  # image 12 is id 2 (18 x 24)
  np.testing.assert_array_equal(ex.masks[1], rect(16, 20, 10, 3, 15, 6))
  np.testing.assert_array_equal(ex.masks[5], rect(18, 24, 4, 5, 12, 20))
  for bad, image in (("The cup_1301.", 13), ("The cup_0001.", 0), ("The lid_990101.", 99)):
    r = {**record, "a": bad}
    assert rec.validate_record(r, 4, max_images=12) == [
        f"record 4: field 'a': tag {bad[4:-1]!r} names IMAGE{image} of 12"]
    with pytest.raises(rec.SkipExample) as info:
      rec.record_to_example(r, 4, image_index=index, image_root=image_dir, max_images=12)
    assert info.value.reason == rec.TAG_IMAGE_OUT_OF_RANGE
  # In a 2-image record the same words are text, as the original reads them: nothing to ground.
  short = {**record, "img_ids": [1, 2], "a": "The cup_1301 and mug_102.", "groundings": {
      "img_1": [record["groundings"]["img_1"][0]]}}
  assert rec.validate_record(short, 0) == []
  assert rec.convert_answer(short["a"], short["groundings"], 2)[0] == (
      "The cup_1301 and <p> mug_2 </p> [SEG] (IMAGE1).")


def test_part_without_object_name_is_skipped():
  groundings = {"img_1": [{"segmentation": [], "name": "handle", "obj_ann_id": 5}]}
  with pytest.raises(rec.SkipExample) as info:
    rec.convert_answer("The handle_10101.", groundings, 1, object_name=lambda ann_id: None)
  assert info.value.reason == rec.PART_OBJECT_UNKNOWN
  groundings["img_1"][0]["obj_name"] = "mug"
  answer = rec.convert_answer("The handle_10101.", groundings, 1)[0]
  assert answer == "The <p> mug_1's handle_1 </p> [SEG] (IMAGE1)."


@pytest.mark.parametrize("case", range(len(bad_records())))
def test_every_bad_input_rule_raises_its_skip_reason(crafted, case):
  record, reason = bad_records()[case]
  index, image_dir = sources_for(crafted).get("paco_lvis", "train")
  with pytest.raises(rec.SkipExample) as info:
    rec.record_to_example(record, 7, image_index=index, image_root=image_dir, max_images=5)
  assert info.value.reason == reason, info.value


def test_skip_example_pickles_for_worker_processes():
  import pickle
  e = pickle.loads(pickle.dumps(rec.SkipExample(rec.MISSING_IMAGE, "a.png: gone")))
  assert (e.reason, e.detail, str(e)) == (rec.MISSING_IMAGE, "a.png: gone", "missing_image: a.png: gone")


def test_max_images_is_configurable(crafted):
  index, image_dir = sources_for(crafted).get("paco_lvis", "train")
  with pytest.raises(rec.SkipExample, match="more than max_images=1"):
    rec.record_to_example(paco_record(), 0, image_index=index, image_root=image_dir, max_images=1)


def test_validate_record_names_index_and_field():
  assert rec.validate_record(paco_record(), 3) == []
  bad = paco_record()
  del bad["q"]
  bad["img_ids"] = [1, 2, 3, 4, 5, 6]
  bad["groundings"]["img_1"][1]["segmentation"] = [[0, 1]]
  bad["groundings"]["img_2"][0].pop("name")
  bad["a"] += " And the mug_202."
  problems = rec.validate_record(bad, 3)
  assert all(p.startswith("record 3: ") for p in problems)
  text = "\n".join(problems)
  assert "field 'q': missing" in text
  assert "field 'img_ids': 6 images, more than max_images=5" in text
  assert "field 'groundings.img_1[1].segmentation': polygon 0 has 2 coordinates" in text
  assert "field 'groundings.img_2[0].name'" in text
  assert "field 'a': tag 'mug_202' is mention 2 in IMAGE2, groundings.img_2 has 1" in text
  assert rec.validate_record([1], 0) == ["record 0: expected an object, got list"]
  problems = rec.validate_record({**paco_record(), "groundings": {"img_9": []}}, 0)
  assert "groundings.img_9" in "\n".join(problems)


def test_load_records_json_and_parquet(tmp_path):
  import pyarrow as pa
  import pyarrow.parquet as pq
  records = [paco_record(), ade_record()]
  json_path = tmp_path / "r_train.json"
  json_path.write_text(json.dumps(records))
  assert rec.load_records(json_path) == records
  # Parquet: nested groundings as a JSON string column, ids as a list column, no category in row 2.
  table = pa.table({
      "dataset_name": [r["dataset_name"] for r in records],
      "img_ids": [[str(i) for i in r["img_ids"]] for r in records],
      "q": [r["q"] for r in records], "a": [r["a"] for r in records],
      "groundings": [json.dumps(r["groundings"]) for r in records],
      "category": ["functional", None],
  })
  parquet_path = tmp_path / "r_train.parquet"
  pq.write_table(table, parquet_path)
  loaded = rec.load_records(parquet_path)
  assert [r["groundings"] for r in loaded] == [r["groundings"] for r in records]
  assert loaded[0]["category"] == "functional" and "category" not in loaded[1]
  assert loaded[1]["img_ids"] == ["11", "12", "13"]
  assert all(rec.validate_record(r, i) == [] for i, r in enumerate(loaded))
  bad = tmp_path / "bad.json"
  bad.write_text("{}")
  with pytest.raises(ValueError, match="expected a JSON list"):
    rec.load_records(bad)


def test_image_index_matches_ids_as_strings_and_names_the_file(tmp_path):
  path = tmp_path / "ann.json"
  path.write_text(json.dumps({"images": [{"id": 5, "file_name": "a/b.jpg", "height": 3, "width": 4}]}))
  index = rec.ImageIndex.from_file(path)
  assert "5" in index and 5 in index and index.info("5") == rec.ImageInfo("a/b.jpg", 3, 4)
  assert index.resolve(5, "/root") == Path("/root/a/b.jpg")
  with pytest.raises(rec.SkipExample, match=f"image id 6 is not in {path}"):
    index.info(6)
  with pytest.raises(rec.SetupError, match=f"annotation file {tmp_path / 'missing.json'} does not exist"):
    rec.ImageIndex.from_file(tmp_path / "missing.json")
  (tmp_path / "list.json").write_text("[]")
  with pytest.raises(rec.SetupError, match="list.json: expected a COCO-style object"):
    rec.ImageIndex.from_file(tmp_path / "list.json")


def test_layouts_normalise_urls_like_local_paths(object_store):
  root = object_store.url("Part_Segm", "paco_lvis")
  annotations, images = rec.SOURCES["paco_lvis"].paths(root, "train")
  assert str(annotations) == f"{root}/annotations/paco_lvis_v1_train.json"
  assert str(images) == object_store.url("coco_2017")
  assert str(rec.under(root, "/abs/x.json")) == "/abs/x.json"
  assert str(rec.under("/local/root", object_store.url("a.json"))) == object_store.url("a.json")
  index = rec.ImageIndex({"5": rec.ImageInfo("val/b.jpg", 3, 4)})
  assert str(index.resolve(5, object_store.url("coco"))) == object_store.url("coco", "val", "b.jpg")


def test_length_stats_nearest_rank_and_budget():
  stats = rec.LengthStats()
  for k in range(1, 101):
    images = 1 if k <= 60 else 2 if k <= 95 else 6
    segs = 0 if k <= 10 else 17 if k > 97 else 4
    stats.add(images, segs, " ".join(["q"] * (101 - k)), " ".join(["a"] * k))
  summary = stats.summary({"answer_words": 95})
  assert summary["examples"] == 100
  assert summary["images"] == {"min": 1, "p50": 1, "p90": 2, "p99": 6, "max": 6, "budget": 5, "over": 5}
  assert summary["segs"] == {"min": 0, "p50": 4, "p90": 4, "p99": 17, "max": 17, "budget": 16, "over": 3}
  for key, budget, over in (("question_words", 32, 68), ("answer_words", 95, 5)):
    assert summary[key] == {"min": 1, "p50": 50, "p90": 90, "p99": 99, "max": 100, "budget": budget,
                            "over": over}
  empty = rec.LengthStats().summary()
  assert empty["examples"] == 0 and empty["segs"] == {"budget": 16, "over": 0}
  assert "no examples" in rec.format_lengths("val", empty)


def test_unusable_record_files_name_the_file(tmp_path):
  cases = {"dir_train.json": None, "dict_train.json": '{"records": []}', "cut_train.json": '[{"q": ',
           "empty_train.json": ""}
  for name, text in cases.items():
    if text is None:
      (tmp_path / name).mkdir()
    else:
      (tmp_path / name).write_text(text)
  expect = {"dir_train.json": "is a directory; --records names JSON or parquet files",
            "dict_train.json": ": expected a JSON list of records, got dict",
            "cut_train.json": ": not valid JSON (Expecting value: line 1 column 8",
            "empty_train.json": ": not valid JSON (Expecting value: line 1 column 1"}
  for name, message in expect.items():
    with pytest.raises(rec.SetupError) as e:
      rec.load_records(tmp_path / name)
    text = str(e.value)
    assert text.startswith(f"records file {tmp_path / name}") and message in text, text
