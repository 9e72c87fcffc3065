"""The released M⁴Seg layout: text-only parquet with unknown column names, read through the field
table, in every encoding of ``groundings``; record files, annotations and images on an object store."""

from __future__ import annotations

import io
import json
import shutil
from contextlib import redirect_stdout

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_m4seg_builder import assert_same_example
from test_records import PACO_SIZES, ade_record, compressed_rle, paco_record, write_crafted

from prima_jax import cli, paths
from prima_jax.data import build, m4seg
from prima_jax.data import records as rec

RENAMED = {"dataset_name": "source", "img_ids": "image_ids", "q": "question", "a": "answer",
           "groundings": "masks", "category": "type"}
GROUNDING = pa.struct([("segmentation", pa.string()), ("name", pa.string()), ("obj_ann_id", pa.int64())])


def canonical(ids: str) -> list[dict]:
  """The crafted paco and ADE records with image ids all ints, all strings, or as written ("mixed")."""
  out = []
  for r in (paco_record(), ade_record()):
    if ids != "mixed":
      r["img_ids"] = [int(i) if ids == "int" else str(i) for i in r["img_ids"]]
    out.append(r)
  return out


def rle_only(records: list[dict]) -> list[dict]:
  """The paco record with every segmentation as compressed RLE (one arrow type for all of them)."""
  r = records[0]
  for key, entries in r["groundings"].items():
    h, w = PACO_SIZES[int(r["img_ids"][int(key[4:]) - 1])]
    for entry in entries:
      entry["segmentation"] = compressed_rle(rec.decode_segmentation(entry["segmentation"], h, w))
  return [r]


def with_json_segmentations(groundings: dict) -> dict:
  return {k: [{**e, "segmentation": json.dumps(e["segmentation"])} for e in v] for k, v in groundings.items()}


# encoding -> (records as the JSON file holds them, how each record's groundings becomes a column value,
# the groundings column's arrow type (None: inferred), the img_ids column's values)
def encoding(kind: str):
  if kind == "json_string":
    records = canonical("mixed")
    return records, [json.dumps(r["groundings"]) for r in records], None, [json.dumps(r["img_ids"]) for r in
                                                                            records]
  if kind == "struct":
    records = canonical("str")
    return records, [with_json_segmentations(r["groundings"]) for r in records], None, [r["img_ids"] for r in
                                                                                         records]
  if kind == "map":
    records = canonical("int")
    values = [list(with_json_segmentations(r["groundings"]).items()) for r in records]
    return records, values, pa.map_(pa.string(), pa.list_(GROUNDING)), [r["img_ids"] for r in records]
  if kind == "struct_native":  # segmentation itself a struct {counts: string, size: list<int64>}
    records = rle_only(canonical("int"))
    return records, [r["groundings"] for r in records], None, [r["img_ids"] for r in records]
  raise ValueError(kind)


ENCODINGS = ("json_string", "struct", "map", "struct_native")


def write_parquet(path, kind: str, columns: dict[str, str] | None = None, extra: dict | None = None):
  """Writes the records of ``kind`` as parquet with column names ``columns`` (ours -> theirs)."""
  columns = {**rec.DEFAULT_FIELDS, **(columns or {})}
  records, groundings, groundings_type, ids = encoding(kind)
  data = {
      columns["dataset_name"]: pa.array([r["dataset_name"] for r in records]),
      columns["img_ids"]: pa.array(ids),
      columns["q"]: pa.array([r["q"] for r in records]),
      columns["a"]: pa.array([r["a"] for r in records]),
      columns["groundings"]: pa.array(groundings, type=groundings_type),
      columns["category"]: pa.array([r.get("category") for r in records], type=pa.string()),
      **(extra or {}),
  }
  path.parent.mkdir(parents=True, exist_ok=True)
  pq.write_table(pa.table(data), path)
  return records


@pytest.mark.parametrize("kind", ENCODINGS)
def test_parquet_groundings_encodings_load_as_the_json_records(tmp_path, kind):
  records = write_parquet(tmp_path / "r_train.parquet", kind)
  (tmp_path / "r_train.json").write_text(json.dumps(records))
  loaded = rec.load_records(tmp_path / "r_train.parquet")
  assert loaded == records == rec.load_records(tmp_path / "r_train.json")
  assert all(rec.validate_record(r, i) == [] for i, r in enumerate(loaded))
  if kind == "struct_native":
    groundings = pq.read_schema(tmp_path / "r_train.parquet").field("groundings").type
    assert pa.types.is_struct(groundings.field("img_1").type.value_type.field("segmentation").type)
  else:
    assert "category" not in loaded[1] and loaded[0]["category"] == "functional"


@pytest.mark.parametrize("kind", ["struct", "map"])
def test_renamed_columns_are_read_through_the_field_table(tmp_path, kind):
  extra = {"id": pa.array([7, 8]), "q": pa.array(["not the question", "nor this"])}
  records = write_parquet(tmp_path / "r_train.parquet", kind, RENAMED, extra)
  assert rec.load_records(tmp_path / "r_train.parquet", fields=RENAMED) == records
  # JSON record files go through the same table.
  renamed = [{RENAMED[k]: v for k, v in r.items()} for r in records]
  (tmp_path / "renamed_train.json").write_text(json.dumps(renamed))
  assert rec.load_records(tmp_path / "renamed_train.json", fields=RENAMED) == records


def test_a_file_with_other_columns_names_expected_found_and_the_flag(tmp_path, capsys):
  path = tmp_path / "released_train.parquet"
  pq.write_table(pa.table({"id": [1], "question": ["q?"], "answer": ["a."], "image_ids": [[1]],
                           "dataset_name": ["paco_lvis"], "groundings": ["{}"]}), path)
  with pytest.raises(rec.SetupError) as info:
    rec.load_records(path)
  message = str(info.value)
  assert "\n" not in message
  assert (f"records file {path}: no column for field(s) img_ids (column 'img_ids'), q (column 'q'), "
          "a (column 'a'); ") in message
  assert "expected columns: dataset_name, img_ids, q, a, groundings (optional: category)" in message
  assert "found columns: id, question, answer, image_ids, dataset_name, groundings" in message
  assert "--field FIELD=COLUMN" in message
  # The CLI prints it as one error line, exit status 2, no traceback; the mapping then reads the file.
  assert cli.call(build, ["--validate", "--records", str(path)]) == 2
  err = capsys.readouterr().err
  assert err == f"error: {message}\n" and "Traceback" not in err
  mapped = ["--field", "q=question", "--field", "a=answer", "--field", "img_ids=image_ids"]
  assert cli.call(build, ["--validate", "--records", str(path), *mapped]) == 0
  assert "train: text-side lengths of 1 example(s)" in capsys.readouterr().out


def test_field_flag_errors():
  with pytest.raises(rec.SetupError, match="unknown field 'question'; the form is --field FIELD=COLUMN"):
    rec.field_table({"question": "q"})
  with pytest.raises(rec.SetupError, match="fields q, a would all read column 'text'"):
    rec.field_table({"q": "text", "a": "text"})
  assert cli.call(build, ["--validate", "--records", "x_train.json", "--field", "question=q"]) == 2


# The crafted ADE20K source has validation files only: its records in a train split read those.
ADE_VAL = {"annotations": {"ade20k_part234": "ade20k_instance_val_mixed_parts.json"},
           "image_dirs": {"ade20k_part234": "images/validation"}}


def sources_argv(crafted) -> list[str]:
  argv = []
  for name, root in crafted["roots"].items():
    argv += ["--image_root", f"{name}={root}"]
  for flag, key in (("--annotations", "annotations"), ("--image_dir", "image_dirs")):
    argv += [flag, f"ade20k_part234={ADE_VAL[key]['ade20k_part234']}"]
  return argv


def test_cli_builds_the_renamed_map_parquet_like_the_json(tmp_path):
  crafted = write_crafted(tmp_path / "src")
  records = write_parquet(tmp_path / "released" / "train.parquet", "map", RENAMED)
  (tmp_path / "records_train.json").write_text(json.dumps(records))
  fields = [a for field, column in RENAMED.items() for a in ("--field", f"{field}={column}")]
  roots = sources_argv(crafted)
  with redirect_stdout(io.StringIO()) as stdout:
    assert cli.call(build, ["--records", f"train={tmp_path / 'released' / 'train.parquet'}", *fields, *roots,
                            "--out", str(tmp_path / "from_parquet")]) == 0
    assert cli.call(build, ["--records", str(tmp_path / "records_train.json"), *roots,
                            "--out", str(tmp_path / "from_json")]) == 0
  assert stdout.getvalue().count("train: kept 2 of 2 records") == 2
  a = m4seg.data_source(tmp_path / "from_parquet", "train")
  b = m4seg.data_source(tmp_path / "from_json", "train")
  assert len(a) == len(b) == 2
  for i in range(2):
    assert_same_example(m4seg.decode_example(a[i]), m4seg.decode_example(b[i]))


def test_wildcard_reads_every_shard_in_order(tmp_path, capsys):
  for shard, kind in enumerate(("json_string", "map")):
    write_parquet(tmp_path / f"train-0000{shard}-of-00002.parquet", kind)
  files = rec.record_files(tmp_path / "train-*.parquet")
  assert [f.name for f in files] == ["train-00000-of-00002.parquet", "train-00001-of-00002.parquet"]
  assert cli.call(build, ["--validate", "--records", str(tmp_path / "train-*.parquet")]) == 0
  assert "train: text-side lengths of 4 example(s)" in capsys.readouterr().out
  assert cli.call(build, ["--validate", "--records", str(tmp_path / "val-*.parquet")]) == 2
  assert capsys.readouterr().err == f"error: --records {tmp_path / 'val-*.parquet'}: no file matches " \
                                    f"{tmp_path / 'val-*.parquet'}\n"


# --------------------------------------------------------------------------------------------------
# Object-store inputs (a fake gs:// bucket: any os / open use of a gs:// path fails)


def test_build_from_object_store_inputs_equals_the_local_build(tmp_path, object_store):
  crafted = write_crafted(tmp_path / "src")
  shutil.copytree(tmp_path / "src", object_store.local(object_store.url("src")))
  released = object_store.url("src", "released")
  write_parquet(object_store.local(f"{released}/m4seg_train.parquet"), "struct")
  write_parquet(tmp_path / "src" / "released" / "m4seg_train.parquet", "struct")
  part_segm = object_store.url("src", "Part_Segm")
  remote = {"train": [f"{part_segm}/crafted_train.json", f"{released}/m4seg_*.parquet"],
            "test": [f"{part_segm}/crafted_test.json"]}
  local = {"train": [crafted["train"], tmp_path / "src" / "released" / "m4seg_train.parquet"],
           "test": [crafted["test"]]}
  remote_roots = {"paco_lvis": f"{part_segm}/paco_lvis", "ade20k_part234": f"{part_segm}/ADE20KPart234"}
  with redirect_stdout(io.StringIO()):
    a = m4seg.build(remote, remote_roots, tmp_path / "remote", **ADE_VAL)
    m4seg.build(local, crafted["roots"], tmp_path / "local", **ADE_VAL)
  assert a.skipped["train"]["kept"] == 3 and a.skipped["test"]["kept"] == 1
  for split in ("train", "test"):
    x, y = m4seg.data_source(tmp_path / "remote", split), m4seg.data_source(tmp_path / "local", split)
    assert len(x) == len(y)
    for i in range(len(x)):
      assert x[i]["images"]["encoded"] == y[i]["images"]["encoded"]
      assert_same_example(m4seg.decode_example(x[i]), m4seg.decode_example(y[i]))
  index, image_dir = a.sources.get("paco_lvis", "train")
  assert image_dir == object_store.url("src", "coco_2017") and index.path.startswith("gs://bucket/")


def test_object_store_errors_are_one_line(tmp_path, object_store, capsys):
  crafted = write_crafted(tmp_path / "src")
  shutil.copytree(tmp_path / "src" / "Part_Segm", object_store.local(object_store.url("Part_Segm")))
  records = object_store.url("Part_Segm", "crafted_train.json")
  root = object_store.url("Part_Segm", "paco_lvis")
  # Images are not in the bucket: the image directory is named with its URL and flag.
  argv = ["--records", records, "--image_root", f"paco_lvis={root}", "--out", str(tmp_path / "o")]
  assert cli.call(build, argv) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "Traceback" not in err
  images = object_store.url("coco_2017")
  assert (f"error: source 'paco_lvis' (split train): image directory {images} does not exist (template "
          f"'../../coco_2017' under --image_root paco_lvis={root}); set it with --image_dir "
          "paco_lvis=TEMPLATE or --image_root paco_lvis=DIR") in err
  assert not (tmp_path / "o").exists()
  # The ArrayRecord output cannot be a URL.
  assert cli.call(build, ["--records", str(crafted["train"]), "--out", object_store.url("out")]) == 2
  err = capsys.readouterr().err
  assert err.startswith(f"error: --out={object_store.url('out')}: the ArrayRecord writer")
  assert err.count("\n") == 1


def test_a_url_without_its_client_fails_in_one_line(tmp_path, monkeypatch, capsys):
  monkeypatch.setattr(paths, "missing_clients", lambda scheme: ["gcsfs"])
  assert cli.call(build, ["--validate", "--records", "gs://bucket/m4seg_train.parquet"]) == 2
  err = capsys.readouterr().err
  assert err == ("error: --records=gs://bucket/m4seg_train.parquet: gs:// needs gcsfs, which is not "
                 "installed (pip install gcsfs); nothing was written\n")


def test_nested_native_segmentation_round_trips_masks(tmp_path):
  """The struct_native encoding decodes to the same masks as the JSON polygons it came from."""
  records = write_parquet(tmp_path / "n_train.parquet", "struct_native")
  loaded = rec.load_records(tmp_path / "n_train.parquet")[0]
  original = canonical("int")[0]
  for key in ("img_1", "img_2"):
    h, w = PACO_SIZES[int(key[4:])]
    for got, want in zip(loaded["groundings"][key], original["groundings"][key]):
      np.testing.assert_array_equal(rec.decode_segmentation(got["segmentation"], h, w),
                                    rec.decode_segmentation(want["segmentation"], h, w))
  assert loaded == records[0]
