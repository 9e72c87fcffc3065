"""Build (or validate) an M⁴Seg-format dataset as TFDS ArrayRecord.

  python -m prima_jax.data.build --records Part_Segm/m4seg_train.json --records test=PATH.parquet \\
      --image_root paco_lvis=Part_Segm/paco_lvis --image_root ade20k_part234=Part_Segm/ADE20KPart234 \\
      --out DATA_DIR [--overwrite] [--strict] [--max_images 5] [--workers N] [--field q=question ...] \\
      [--budget segs=16]
  python -m prima_jax.data.build --validate --records ... [--image_root ...]

``--records [SPLIT=]PATH`` (JSON or parquet; repeatable; a wildcard in the file name, quoted, reads
every match): without ``SPLIT=`` the split is the last of train/val/validation/test in the file name.
``--field FIELD=COLUMN`` reads our record field FIELD (dataset_name, img_ids, q, a, groundings,
category) from the file's column COLUMN. ``--image_root NAME=DIR``: the folder of source NAME in
the original layout (see ``prima_jax.data.records.SOURCES``); ``--annotations NAME=TEMPLATE`` and
``--image_dir NAME=TEMPLATE`` override its annotation file / image directory (``{split}``,
``{image_split}``; relative to DIR). Record files, annotation files and images may be object-store
URLs (gs://...); ``--out`` must be a local directory (or a mounted bucket).

The build is atomic: it is written beside its place (``DATA_DIR/.m4_seg.tmp-XXXXXXXX``) and renamed
to ``DATA_DIR/m4_seg`` when complete, so a failed or killed build leaves no partial dataset. A
``--out`` that already holds a build is refused (one ``error:`` line) unless ``--overwrite``, which
replaces ``DATA_DIR/m4_seg`` whole; scratch directories of killed builds are removed on the next
build (kept, and said so, while their process still runs).

Every record file is read and every annotation file and image directory the records need is
checked before any conversion: a problem is printed as one ``error:`` line naming the path and the
flag that sets it (exit status 2). ``--validate`` writes nothing: it prints every problem of a
record with its file and record index (structure, then images and masks for sources with an image
root) and exits 1 if there is any. Both print per split the text-side lengths of the examples kept
(images, [SEG], question and answer words: min / median / p90 / p99 / max) and how many exceed
``--budget NAME=N`` (images, segs, question_words, answer_words).
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping, Sequence

from absl import flags

from prima_jax import cli, paths
from prima_jax.data import m4seg
from prima_jax.data import records as rec

_SPLIT_IN_NAME = re.compile(r"(?:^|[_\-.])(train|val|validation|test)(?=$|[_\-.])")


def split_of(path: str) -> str:
  """The split named in a record file's name (``x_train.json`` -> ``train``); ValueError if none."""
  found = _SPLIT_IN_NAME.findall(os.fspath(path).rstrip("/").rsplit("/", 1)[-1])
  if not found:
    raise ValueError(f"cannot tell the split of {path!r} from its name: pass SPLIT=PATH")
  return "val" if found[-1] == "validation" else found[-1]


def parse_records(args: Sequence[str]) -> dict[str, list[str]]:
  """``[SPLIT=]PATH`` arguments -> {split: [paths]} (order kept)."""
  out: dict[str, list[str]] = {}
  for arg in args:
    split, sep, path = arg.partition("=")
    if not sep or not re.fullmatch(r"\w+", split):
      split, path = split_of(arg), arg
    out.setdefault(split, []).append(path)
  return out


def parse_pairs(args: Sequence[str], flag: str) -> dict[str, str]:
  """``NAME=VALUE`` arguments -> dict; ValueError naming the flag otherwise."""
  out = {}
  for arg in args:
    name, sep, value = arg.partition("=")
    if not sep or not name or not value:
      raise ValueError(f"{flag} expects NAME=VALUE, got {arg!r}")
    out[name] = value
  return out


def parse_budget(args: Sequence[str]) -> dict[str, int]:
  """``NAME=N`` arguments -> the budget table (``records.budget_table``); ValueError naming the flag."""
  budget = {}
  for name, value in parse_pairs(args, "--budget").items():
    if not re.fullmatch(r"\d+", value):
      raise ValueError(f"--budget {name}={value}: N must be a non-negative integer")
    budget[name] = int(value)
  return rec.budget_table(budget)


def validate(records: Mapping[str, Sequence[str]], sources: m4seg.Sources, *, max_images: int,
             fields: Mapping[str, str] | None = None, budget: Mapping[str, int] | None = None,
             out=None) -> int:
  """Prints every problem as ``FILE (split) record I: ...`` to ``out`` (stdout), then per split the
  text-side lengths of the records without problems; returns the bad count.

  Raises:
    SetupError: a record file, annotation file or image directory is missing or unreadable, or a
      record file lacks a column (checked before any record).
  """
  out = out or sys.stdout
  inputs = m4seg.load_inputs(records, sources, fields=fields)
  bad = 0
  for split, files in inputs.items():
    lengths = rec.LengthStats()
    index = 0
    for path, split_records in files:
      for i, record in enumerate(split_records):
        problems = rec.validate_record(record, i, max_images=max_images)
        example = None
        if not problems and record["dataset_name"] in sources.image_roots:
          try:
            example = sources.convert(record, index, split, max_images=max_images)[0]
          except rec.SkipExample as e:
            problems = [f"record {i}: {e.reason}: {e.detail}"]
        for problem in problems:
          print(f"{path} ({split}) {problem}", file=out)
        if problems:
          bad += 1
        elif example is not None:
          lengths.add_example(example)
        else:
          lengths.add_record(record)
        index += 1
    print(rec.format_lengths(split, lengths.summary(budget), prefix=""), file=out)
  for name, splits in m4seg.unconfigured(inputs, sources).items():
    print(f"note: no --image_root for source {name!r} ({', '.join(splits)}): its images and masks were not "
          "checked", file=out)
  print(f"{bad} record(s) with problems", file=out)
  return bad


def define_flags(fv: flags.FlagValues = flags.FLAGS) -> None:
  """The command's flags, on ``fv`` (see ``prima_jax.cli.call``)."""
  flags.DEFINE_multi_string("records", [], "[SPLIT=]PATH of a record file (JSON or parquet; repeatable; "
                            "required).", flag_values=fv)
  flags.DEFINE_multi_string("field", [], "FIELD=COLUMN: read record field FIELD from column COLUMN "
                            "(repeatable; default: same name).", flag_values=fv)
  flags.DEFINE_multi_string("image_root", [], "NAME=DIR: the folder of source NAME (repeatable).",
                            flag_values=fv)
  flags.DEFINE_multi_string("annotations", [], "NAME=TEMPLATE: source NAME's annotation file (repeatable).",
                            flag_values=fv)
  flags.DEFINE_multi_string("image_dir", [], "NAME=TEMPLATE: source NAME's image directory (repeatable).",
                            flag_values=fv)
  flags.DEFINE_string("out", None, "DATA_DIR: local TFDS data dir (required unless --validate).",
                      flag_values=fv)
  flags.DEFINE_bool("overwrite", False, "Replace an existing build in --out (DATA_DIR/m4_seg); default: "
                    "refuse it.", flag_values=fv)
  flags.DEFINE_bool("strict", False, "Fail on the first bad record.", flag_values=fv)
  flags.DEFINE_integer("max_images", rec.DEFAULT_MAX_IMAGES, "Images per example at most.", flag_values=fv)
  flags.DEFINE_integer("workers", 1, "Processes converting records.", flag_values=fv)
  flags.DEFINE_bool("validate", False, "Check records and images, write nothing.", flag_values=fv)
  defaults = " ".join(f"{k}={v}" for k, v in rec.DEFAULT_BUDGET.items())
  flags.DEFINE_multi_string("budget", [], f"NAME=N: count examples with more than N of NAME (repeatable; "
                            f"default {defaults}).", flag_values=fv)


def _error(message: str) -> int:
  for line in message.splitlines():
    print(f"error: {line}", file=sys.stderr)
  return 2


def main(argv: Sequence[str], fv: flags.FlagValues = flags.FLAGS) -> int:
  """The command on parsed flags ``fv`` (exit status: 0 ok, 1 ``--validate`` found problems, 2 bad input)."""
  if len(argv) > 1:
    return _error(f"unexpected argument(s): {' '.join(argv[1:])}")
  args = fv
  if not args.records:
    return _error("--records is required")
  try:
    records = parse_records(args.records)
    roots = parse_pairs(args.image_root, "--image_root")
    annotations = parse_pairs(args.annotations, "--annotations")
    image_dirs = parse_pairs(args.image_dir, "--image_dir")
    fields = rec.field_table(parse_pairs(args.field, "--field"))
    budget = parse_budget(args.budget)
  except ValueError as e:  # SetupError is one
    return _error(str(e))
  try:
    if args.validate:
      sources = m4seg.Sources(roots, annotations=annotations, image_dirs=image_dirs)
      return 1 if validate(records, sources, max_images=args.max_images, fields=fields, budget=budget) else 0
    if not args.out:
      return _error("--out is required unless --validate")
    builder = m4seg.build(records, roots, args.out, annotations=annotations, image_dirs=image_dirs,
                          strict=args.strict, max_images=args.max_images, num_workers=args.workers,
                          fields=fields, budget=budget, overwrite=args.overwrite, what="--out")
  except (rec.SetupError, paths.PathError, FileExistsError, m4seg.BuildError) as e:
    return _error(str(e))
  print(f"wrote {builder.data_dir} (skip summary: {builder.data_dir}/{m4seg.SKIPPED_FILE})")
  return 0


if __name__ == "__main__":
  define_flags()
  cli.run(main)
