"""TFDS ArrayRecord builder and the build/validate CLI, on the crafted files of test_records.py."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds
from test_records import (
  ADE_ANSWER,
  PACO_ANSWER,
  ade_record,
  bad_records,
  paco_record,
  sources_for,
  write_crafted,
)

from prima_jax import cli
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
    argv += ["--image_root", f"{name}={root}"]
  with redirect_stdout(io.StringIO()) as stdout:
    assert cli.call(build, argv) == 0
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
    argv += ["--image_root", f"{name}={root}"]
  with redirect_stdout(io.StringIO()) as stdout:
    assert cli.call(build, argv) == 1
  lines = stdout.getvalue().splitlines()
  for i in range(1, n - 1):  # every bad record, by index (the last one has an unconfigured source)
    assert any(f"record {i}:" in line for line in lines), (i, lines)
  assert not any("record 0:" in line for line in lines)
  assert "record 1: missing_image" in stdout.getvalue()
  assert "no --image_root for source 'no_such_source'" in stdout.getvalue()
  assert not (tmp_path / "out").exists()
  with redirect_stdout(io.StringIO()) as stdout:
    assert cli.call(build, ["--validate", "--records", str(crafted["train"]),
                            "--image_root", f"paco_lvis={crafted['roots']['paco_lvis']}"]) == 0
  assert "0 record(s) with problems" in stdout.getvalue()


def test_record_arguments():
  assert build.split_of("Part_Segm/m4seg_validation.json") == "val"
  assert build.split_of("x/train-00000.parquet") == "train"
  assert build.parse_records(["a_test.json", "val=weird.json", "b_test.json"]) == {
      "test": ["a_test.json", "b_test.json"], "val": ["weird.json"]}
  with pytest.raises(ValueError, match="SPLIT=PATH"):
    build.split_of("records.json")


# --------------------------------------------------------------------------------------------------
# Missing source paths: one error line each, checked for all sources before any conversion


def crafted_argv(crafted, **overrides) -> list[str]:
  roots = {**crafted["roots"], **overrides}
  argv = ["--records", str(crafted["train"]), "--records", f"test={crafted['test']}"]
  for name, root in roots.items():
    argv += ["--image_root", f"{name}={root}"]
  return argv


def test_cli_names_missing_source_paths_and_their_flags_without_a_traceback(tmp_path):
  crafted = write_crafted(tmp_path / "src")
  paco = tmp_path / "elsewhere" / "paco_lvis"
  argv = crafted_argv(crafted, paco_lvis=paco) + ["--out", str(tmp_path / "out")]
  run = subprocess.run([sys.executable, "-m", "prima_jax.data.build", *argv], capture_output=True, text=True,
                       timeout=120, cwd=Path(__file__).parent.parent)
  assert run.returncode == 2, run.stderr
  assert "Traceback" not in run.stderr
  lines = run.stderr.splitlines()
  assert lines == [
      f"error: source 'paco_lvis' (split train): annotation file {paco}/annotations/paco_lvis_v1_train.json "
      f"does not exist (template 'annotations/paco_lvis_v1_{{split}}.json' under --image_root "
      f"paco_lvis={paco}); set it with --annotations paco_lvis=TEMPLATE or --image_root paco_lvis=DIR",
      f"error: source 'paco_lvis' (split train): image directory {tmp_path}/coco_2017 does not exist "
      f"(template '../../coco_2017' under --image_root paco_lvis={paco}); set it with --image_dir "
      "paco_lvis=TEMPLATE or --image_root paco_lvis=DIR"]
  assert not (tmp_path / "out").exists()


def test_overrides_are_checked_for_every_source_and_split_up_front(tmp_path, capsys):
  crafted = write_crafted(tmp_path / "src")
  ade = crafted["roots"]["ade20k_part234"]
  both = crafted_argv(crafted) + ["--records", f"val={crafted['test']}",
                                  "--annotations", "ade20k_part234=/data/ade/{split}.json",
                                  "--image_dir", "paco_lvis=coco/{image_split}"]
  assert cli.call(build, both + ["--out", str(tmp_path / "out")]) == 2
  err = capsys.readouterr().err.splitlines()
  paco = crafted["roots"]["paco_lvis"]
  assert err == [
      f"error: source 'paco_lvis' (split train): image directory {paco}/coco/train does not exist (template "
      f"'coco/{{image_split}}' under --image_root paco_lvis={paco}); set it with --image_dir "
      "paco_lvis=TEMPLATE or --image_root paco_lvis=DIR",
      "error: source 'ade20k_part234' (splits test, val): annotation file /data/ade/val.json does not exist "
      "(--annotations ade20k_part234=/data/ade/{split}.json); set it with --annotations "
      "ade20k_part234=TEMPLATE or --image_root ade20k_part234=DIR"]
  assert not (tmp_path / "out").exists()
  # --validate checks the same paths before any record.
  assert cli.call(build, ["--validate"] + both) == 2
  assert capsys.readouterr().err.splitlines() == err
  # Pointing the overrides at the real files makes the same command work.
  fixed = crafted_argv(crafted) + ["--records", f"val={crafted['test']}", "--annotations",
                                   f"ade20k_part234={ade}/ade20k_instance_val_mixed_parts.json"]
  assert cli.call(build, ["--validate"] + fixed) == 0
  with pytest.raises(rec.SetupError, match="image directory .*coco/train does not exist"):
    m4seg.build({"train": [crafted["train"]]}, crafted["roots"], tmp_path / "out",
                image_dirs={"paco_lvis": "coco/{image_split}"})


def test_a_missing_record_file_is_one_error_line(tmp_path, capsys):
  assert cli.call(build, ["--validate", "--records", str(tmp_path / "m4seg_train.json")]) == 2
  assert capsys.readouterr().err == f"error: records file {tmp_path / 'm4seg_train.json'} does not exist " \
                                    "(--records)\n"


# --------------------------------------------------------------------------------------------------
# Text-side lengths per split (what a training budget would drop)


def small_record():
  return {"dataset_name": "paco_lvis", "img_ids": [1], "q": "Where is the mug_101?", "a": "Here: mug_101.",
          "groundings": {"img_1": [{"segmentation": [[1, 1, 8, 1, 8, 8, 1, 8]], "name": "mug"}]}}


# paco_record: 2 images, 3 [SEG], 9 question words, 31 answer words (PACO_ANSWER); ade_record: 3, 4, 5, 33
# (ADE_ANSWER); small_record: 1, 1, 4 ("Where is the mug?"), 6 ("Here: <p> mug_1 </p> [SEG] (IMAGE1).").
HAND_MADE = {"images": [2, 3, 1], "segs": [3, 4, 1], "question_words": [9, 5, 4], "answer_words": [31, 33, 6]}
BUDGET = {"images": 2, "segs": 3, "question_words": 8, "answer_words": 40}
# Nearest rank over 3 values: median = 2nd smallest, p90 = p99 = the largest.
EXPECTED_LINES = [
    "images per example min 1 median 2 p90 3 p99 3 max 3 > 2: 1 (33.3%)",
    "[SEG] per example min 1 median 3 p90 4 p99 4 max 4 > 3: 1 (33.3%)",
    "question words min 4 median 5 p90 9 p99 9 max 9 > 8: 1 (33.3%)",
    "answer words min 6 median 31 p90 33 p99 33 max 33 > 40: 0 (0.0%)",
]


def length_lines(text: str, split: str) -> list[str]:
  lines = [" ".join(line.replace("[m4seg]", "").split()) for line in text.splitlines()]
  start = next(i for i, line in enumerate(lines) if line.startswith(f"{split}: text-side lengths of"))
  return lines[start:start + 5]


def test_validate_prints_the_text_side_lengths_of_records_without_problems(tmp_path, capsys):
  path = tmp_path / "hand_train.json"
  broken = {k: v for k, v in small_record().items() if k != "a"}
  path.write_text(json.dumps([paco_record(), ade_record(), broken, small_record()]))
  budget = [a for k, v in BUDGET.items() for a in ("--budget", f"{k}={v}")]
  assert cli.call(build, ["--validate", "--records", str(path), *budget]) == 1  # the broken record
  lines = length_lines(capsys.readouterr().out, "train")
  assert lines[0] == "train: text-side lengths of 3 example(s) (words split on whitespace, question and " \
                     "answer as converted):"
  assert lines[1:] == EXPECTED_LINES


def test_build_summary_holds_the_lengths_of_the_kept_examples(tmp_path):
  crafted = write_crafted(tmp_path / "src")
  path = tmp_path / "hand_train.json"
  missing_image = {**small_record(), "img_ids": [3]}  # skipped: not counted
  path.write_text(json.dumps([paco_record(), missing_image, small_record(), ade_record()]))
  ade_val = {"ade20k_part234": "ade20k_instance_val_mixed_parts.json"}
  with redirect_stdout(io.StringIO()) as stdout:
    builder = m4seg.build({"train": [path]}, crafted["roots"], tmp_path / "out", budget=BUDGET,
                          annotations=ade_val, image_dirs={"ade20k_part234": "images/validation"})
  summary = builder.skipped["train"]
  assert summary["kept"] == 3 and summary["skipped"] == {rec.MISSING_IMAGE: 1}
  order = [0, 2, 1]  # paco, small, ade in file order; HAND_MADE lists paco, ade, small
  for key, values in HAND_MADE.items():
    values = sorted(values[i] for i in order)
    assert summary["lengths"][key] == {"budget": BUDGET[key], "over": sum(v > BUDGET[key] for v in values),
                                       "min": values[0], "p50": values[1], "p90": values[2], "p99": values[2],
                                       "max": values[2]}
  assert length_lines(stdout.getvalue(), "train")[1:] == EXPECTED_LINES
  assert m4seg.load_skipped(tmp_path / "out")["train"]["lengths"] == summary["lengths"]
  with pytest.raises(rec.SetupError, match="--budget tokens=3: expected NAME=N"):
    rec.budget_table({"tokens": 3})


# --------------------------------------------------------------------------------------------------
# Atomic builds: an existing build is refused or replaced whole, a failed build leaves no trace


def build_argv(crafted, out, *splits):
  argv = [arg for split in splits for arg in ("--records", f"{split}={crafted[split]}")] + ["--out", str(out)]
  for name, root in crafted["roots"].items():
    argv += ["--image_root", f"{name}={root}"]
  return argv


def scratch_dirs(out):
  return sorted(p.name for p in out.iterdir() if p.name.startswith(".m4_seg."))


def test_an_existing_build_is_refused_unless_overwrite_which_replaces_it(tmp_path, capsys):
  crafted = write_crafted(tmp_path / "src")
  out = tmp_path / "out"
  assert cli.call(build, build_argv(crafted, out, "train")) == 0
  (out / "notes.txt").write_text("mine")
  before = sorted(p.name for p in (out / "m4_seg/1.0.0").iterdir())
  capsys.readouterr()
  assert cli.call(build, build_argv(crafted, out, "test")) == 2
  captured = capsys.readouterr()
  assert captured.err == (f"error: --out={out} already holds an M4Seg build ({out / 'm4_seg'}); pass "
                          "--overwrite (overwrite=True) to replace it\n")
  assert "wrote" not in captured.out
  assert sorted(p.name for p in (out / "m4_seg/1.0.0").iterdir()) == before
  assert cli.call(build, build_argv(crafted, out, "test") + ["--overwrite"]) == 0
  assert f"wrote {out / 'm4_seg/1.0.0'}" in capsys.readouterr().out
  assert len(m4seg.data_source(out, "test")) == 1
  with pytest.raises(Exception, match="train"):  # replaced whole: the old split is gone
    m4seg.data_source(out, "train")
  assert set(m4seg.load_skipped(out)) == {"test"}
  assert (out / "notes.txt").read_text() == "mine" and scratch_dirs(out) == []


def test_a_build_failing_midway_leaves_the_previous_build_and_no_scratch(tmp_path, capsys):
  crafted, bad, _, _ = write_bad_file(tmp_path)
  out = tmp_path / "out"
  assert cli.call(build, build_argv(crafted, out, "train")) == 0
  argv = ["--records", str(crafted["train"]), "--records", f"train={bad}", "--out", str(out), "--overwrite",
          "--strict"] + [f"--image_root={name}={root}" for name, root in crafted["roots"].items()]
  capsys.readouterr()
  assert cli.call(build, argv) == 2  # record 0 of the second file is converted, record 1 stops the build
  err = capsys.readouterr().err
  assert err.splitlines()[-1].startswith(f"error: {bad} record 1 (train example 2): missing_image: ")
  assert "Traceback" not in err
  assert len(m4seg.data_source(out, "train")) == 1 and scratch_dirs(out) == []
  assert m4seg.load_skipped(out)["train"]["records"] == 1  # the previous build's summary
  fresh = tmp_path / "fresh"
  with pytest.raises(m4seg.BuildError, match="missing_image"):
    m4seg.build({"train": [bad]}, crafted["roots"], fresh, strict=True)
  assert sorted(p.name for p in fresh.iterdir()) == []


def test_an_unreadable_annotation_file_stops_the_build_before_any_work(tmp_path, capsys):
  crafted = write_crafted(tmp_path / "src")
  garbage = tmp_path / "garbage.json"
  garbage.write_text("not json")
  argv = build_argv(crafted, tmp_path / "out", "train") + ["--annotations", f"paco_lvis={garbage}"]
  assert cli.call(build, argv) == 2
  assert capsys.readouterr().err == (f"error: source 'paco_lvis' (split train): annotation file {garbage}: "
                                     "not valid JSON (Expecting value: line 1 column 1 (char 0))\n")
  assert not (tmp_path / "out").exists()


def test_a_split_without_any_example_is_one_error_and_writes_nothing(tmp_path, capsys):
  crafted = write_crafted(tmp_path / "src")
  path = tmp_path / "none_train.json"
  path.write_text(json.dumps([{**paco_record(), "img_ids": [1, 3]}]))  # image 3 has no file
  argv = ["--records", str(path), "--out", str(tmp_path / "out")]
  argv += [f"--image_root={name}={root}" for name, root in crafted["roots"].items()]
  assert cli.call(build, argv) == 2
  assert capsys.readouterr().err.splitlines()[-1] == (
      "error: split 'train': none of its 1 record(s) became an example (skipped: missing_image=1; the "
      "details with --validate); nothing was written")
  assert sorted(p.name for p in (tmp_path / "out").iterdir()) == []


def test_leftovers_of_killed_builds_are_removed_and_running_ones_kept(tmp_path, capsys):
  import os
  import socket

  crafted = write_crafted(tmp_path / "src")
  out = tmp_path / "out"
  dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                        text=True, check=True)
  host = socket.gethostname()
  leftovers = {".m4_seg.tmp-0000dead": f"{host} {dead.stdout.strip()}",  # its process has exited
               ".m4_seg.tmp-00000a1e": f"{host} {os.getpid()}",  # this process: still running
               ".m4_seg.tmp-0000e15e": "another-host 1",  # unknowable: kept
               ".m4_seg.old-00000000": None}  # moved aside by an interrupted replacement
  for name, owner in leftovers.items():
    (out / name / "m4_seg").mkdir(parents=True)
    if owner:
      (out / name / "OWNER").write_text(owner + "\n")
  (out / ".other.tmp-00000000").mkdir()  # not a build of this target: untouched
  assert cli.call(build, build_argv(crafted, out, "train")) == 0
  printed = capsys.readouterr().out
  assert f"[m4seg] removed {out / '.m4_seg.tmp-0000dead'}, left by an interrupted build" in printed
  assert f"[m4seg] removed {out / '.m4_seg.old-00000000'}" in printed
  assert f"[m4seg] kept {out / '.m4_seg.tmp-00000a1e'}: the build of process {host} {os.getpid()}" in printed
  assert scratch_dirs(out) == [".m4_seg.tmp-00000a1e", ".m4_seg.tmp-0000e15e"]
  assert (out / ".other.tmp-00000000").is_dir() and len(m4seg.data_source(out, "train")) == 1


def test_an_out_that_is_a_file_is_one_error_line(tmp_path, capsys):
  crafted = write_crafted(tmp_path / "src")
  (tmp_path / "out").write_text("x")
  assert cli.call(build, build_argv(crafted, tmp_path / "out", "train")) == 2
  assert capsys.readouterr().err == f"error: --out={tmp_path / 'out'} is a file, not a directory\n"


def test_images_over_the_pixel_limit_are_skipped_and_counted(tmp_path, monkeypatch, capsys):
  from prima_jax.data import images

  crafted = write_crafted(tmp_path / "src")
  path = tmp_path / "sizes_train.json"
  path.write_text(json.dumps([small_record(), paco_record()]))  # images 20x16; 20x16 and 24x18
  monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 400)
  builder = m4seg.build({"train": [path]}, crafted["roots"], tmp_path / "out")
  summary = builder.skipped["train"]
  assert summary["kept"] == 1 and summary["skipped"] == {rec.IMAGE_TOO_LARGE: 1}
  assert summary["details"][0]["record"] == 1
  assert "000000000002.png: 24x18 = 432 pixels, over the limit of 400" in summary["details"][0]["detail"]
  assert "skipped: image_too_large=1" in capsys.readouterr().out
  assert len(m4seg.data_source(tmp_path / "out", "train")) == 1
