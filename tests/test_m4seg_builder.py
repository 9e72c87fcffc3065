"""TFDS ArrayRecord builder and the build/validate CLI, on the crafted files of test_records.py."""

from __future__ import annotations

import io
import json
import sys
from contextlib import redirect_stdout

import numpy as np
import pytest
import tensorflow_datasets as tfds
from test_records import ADE_ANSWER, PACO_ANSWER, bad_records, paco_record, sources_for, write_crafted

from prima_jax.data import build, m4seg
from prima_jax.data import records as rec


def assert_same_example(a, b):
  for field in ("example_id", "source", "category", "image_ids", "question", "answer", "phrases",
                "mask_image"):
    assert getattr(a, field) == getattr(b, field), field
  assert len(a.images) == len(b.images) and len(a.masks) == len(b.masks)
  for x, y in zip(a.images + a.masks, b.images + b.masks):
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(x, y)


def test_build_cli_round_trip_through_the_data_source(tmp_path):
  crafted = write_crafted(tmp_path / "src")
  out = tmp_path / "out"
  argv = ["--records", str(crafted["train"]), "--records", f"test={crafted['test']}", "--out", str(out)]
  for name, root in crafted["roots"].items():
    argv += ["--image-root", f"{name}={root}"]
  with redirect_stdout(io.StringIO()) as stdout:
    assert build.main(argv) == 0
  assert "train: kept 1 of 1 records; skipped: none" in stdout.getvalue()
  assert "tensorflow" not in sys.modules
  sources = sources_for(crafted)
  cases = (("train", crafted["train"], PACO_ANSWER), ("test", crafted["test"], ADE_ANSWER))
  for split, path, answer in cases:
    source = m4seg.data_source(out, split)
    assert len(source) == 1
    raw = source[0]
    assert isinstance(raw["images"]["encoded"][0], bytes)
    decoded = m4seg.decode_example(raw)
    decoded.check()
    record = rec.load_records(path)[0]
    image_index, image_dir = sources.get(record["dataset_name"], split)
    expected = rec.record_to_example(record, 0, image_index=image_index, image_root=image_dir, split=split)
    assert decoded.answer == answer
    assert_same_example(decoded, expected)
    # The stored images are the original files, byte for byte.
    for data, image_id in zip(raw["images"]["encoded"], record["img_ids"]):
      assert data == image_index.resolve(image_id, image_dir).read_bytes()
  assert "tensorflow" not in sys.modules
  assert m4seg.load_skipped(out)["test"]["kept"] == 1


def write_bad_file(tmp_path):
  crafted = write_crafted(tmp_path / "src")
  cases = bad_records()
  records = [paco_record()] + [r for r, _ in cases] + [{**paco_record(), "dataset_name": "no_such_source"}]
  path = tmp_path / "bad_train.json"
  path.write_text(json.dumps(records))
  expected = {}
  for _, reason in cases:
    expected[reason] = expected.get(reason, 0) + 1
  expected[rec.UNKNOWN_SOURCE] = 1
  return crafted, path, expected, len(records)


def test_bad_records_are_skipped_and_counted_by_reason(tmp_path):
  crafted, path, expected, n = write_bad_file(tmp_path)
  with redirect_stdout(io.StringIO()) as stdout:
    builder = m4seg.build({"train": [path]}, crafted["roots"], tmp_path / "out", max_images=5)
  summary = builder.skipped["train"]
  assert summary["skipped"] == expected
  assert summary["records"] == n and summary["kept"] == 1
  assert [d["record"] for d in summary["details"]] == list(range(1, n))
  assert f"kept 1 of {n} records" in stdout.getvalue() and "missing_image=1" in stdout.getvalue()
  assert m4seg.load_skipped(tmp_path / "out") == json.loads(json.dumps(builder.skipped))
  source = m4seg.data_source(tmp_path / "out", "train")
  assert len(source) == 1 and m4seg.decode_example(source[0]).answer == PACO_ANSWER


def test_worker_processes_give_the_same_data_and_counts(tmp_path):
  crafted, path, expected, _ = write_bad_file(tmp_path)
  with redirect_stdout(io.StringIO()):
    one = m4seg.build({"train": [path]}, crafted["roots"], tmp_path / "one")
    two = m4seg.build({"train": [path]}, crafted["roots"], tmp_path / "two", num_workers=2)
  assert one.skipped == two.skipped and two.skipped["train"]["skipped"] == expected
  a, b = m4seg.data_source(tmp_path / "one", "train"), m4seg.data_source(tmp_path / "two", "train")
  assert len(a) == len(b) == 1
  assert_same_example(m4seg.decode_example(a[0]), m4seg.decode_example(b[0]))
  # The registered name works too.
  assert len(tfds.data_source("m4_seg", data_dir=str(tmp_path / "two"), split="train")) == 1


def test_strict_fails_on_the_first_bad_record(tmp_path):
  crafted, path, _, _ = write_bad_file(tmp_path)
  with pytest.raises(Exception, match=r"bad_train.json record 1 .*missing_image"):
    m4seg.build({"train": [path]}, crafted["roots"], tmp_path / "out", strict=True)


def test_validate_prints_every_problem_with_its_record_index(tmp_path):
  crafted, path, expected, n = write_bad_file(tmp_path)
  argv = ["--validate", "--records", str(path)]
  for name, root in crafted["roots"].items():
    argv += ["--image-root", f"{name}={root}"]
  with redirect_stdout(io.StringIO()) as stdout:
    assert build.main(argv) == 1
  lines = stdout.getvalue().splitlines()
  for i in range(1, n - 1):  # every bad record, by index (the last one has an unconfigured source)
    assert any(f"record {i}:" in line for line in lines), (i, lines)
  assert not any("record 0:" in line for line in lines)
  assert "record 1: missing_image" in stdout.getvalue()
  assert "no --image-root for source 'no_such_source'" in stdout.getvalue()
  assert not (tmp_path / "out").exists()
  with redirect_stdout(io.StringIO()) as stdout:
    assert build.main(["--validate", "--records", str(crafted["train"]),
                       "--image-root", f"paco_lvis={crafted['roots']['paco_lvis']}"]) == 0
  assert "0 record(s) with problems" in stdout.getvalue()


def test_record_arguments():
  assert build.split_of("Part_Segm/m4seg_validation.json") == "val"
  assert build.split_of("x/train-00000.parquet") == "train"
  assert build.parse_records(["a_test.json", "val=weird.json", "b_test.json"]) == {
      "test": ["a_test.json", "b_test.json"], "val": ["weird.json"]}
  with pytest.raises(ValueError, match="SPLIT=PATH"):
    build.split_of("records.json")
