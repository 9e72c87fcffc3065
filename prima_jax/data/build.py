"""Build (or validate) an M⁴Seg-format dataset as TFDS ArrayRecord.

  python -m prima_jax.data.build --records Part_Segm/m4seg_train.json --records test=PATH.parquet \\
      --image-root paco_lvis=Part_Segm/paco_lvis --image-root ade20k_part234=Part_Segm/ADE20KPart234 \\
      --out DATA_DIR [--strict] [--max-images 5] [--workers N]
  python -m prima_jax.data.build --validate --records ... --image-root ...

``--records [SPLIT=]PATH`` (JSON or parquet; repeatable): without ``SPLIT=`` the split is the last of
train/val/validation/test in the file name. ``--image-root NAME=DIR``: the folder of source NAME in
the original layout (see ``prima_jax.data.records.SOURCES``); ``--annotations NAME=TEMPLATE`` and
``--image-dir NAME=TEMPLATE`` override its annotation file / image directory (``{split}``,
``{image_split}``; relative to DIR). ``--validate`` writes nothing: it prints every problem with its
file and record index (structure, then images and masks for sources with an image root) and exits 1
if there is any.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from prima_jax.data import m4seg
from prima_jax.data import records as rec

_SPLIT_IN_NAME = re.compile(r"(?:^|[_\-.])(train|val|validation|test)(?=$|[_\-.])")


def split_of(path: str) -> str:
  """The split named in a record file's name (``x_train.json`` -> ``train``); ValueError if none."""
  found = _SPLIT_IN_NAME.findall(Path(path).name)
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


def validate(records: dict[str, list[str]], sources: m4seg.Sources, *, max_images: int,
             out=None) -> int:
  """Prints every problem as ``FILE (split) record I: ...`` to ``out`` (stdout); returns the bad count."""
  out = out or sys.stdout
  bad = 0
  unchecked: set[str] = set()
  for split, paths in records.items():
    index = 0
    for path in paths:
      for i, record in enumerate(rec.load_records(path)):
        problems = rec.validate_record(record, i, max_images=max_images)
        name = record.get("dataset_name") if isinstance(record, dict) else None
        if not problems and name not in sources.image_roots:
          unchecked.add(str(name))
        elif not problems:
          try:
            sources.convert(record, index, split, max_images=max_images)
          except rec.SkipExample as e:
            problems = [f"record {i}: {e.reason}: {e.detail}"]
        for problem in problems:
          print(f"{path} ({split}) {problem}", file=out)
        bad += bool(problems)
        index += 1
  for name in sorted(unchecked):
    print(f"note: no --image-root for source {name!r}: its images and masks were not checked", file=out)
  print(f"{bad} record(s) with problems", file=out)
  return bad


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m prima_jax.data.build", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--records", action="append", required=True, metavar="[SPLIT=]PATH")
  parser.add_argument("--image-root", action="append", default=[], metavar="NAME=DIR")
  parser.add_argument("--annotations", action="append", default=[], metavar="NAME=TEMPLATE")
  parser.add_argument("--image-dir", action="append", default=[], metavar="NAME=TEMPLATE")
  parser.add_argument("--out", metavar="DATA_DIR", help="TFDS data dir (required unless --validate)")
  parser.add_argument("--strict", action="store_true", help="fail on the first bad record")
  parser.add_argument("--max-images", type=int, default=rec.DEFAULT_MAX_IMAGES)
  parser.add_argument("--workers", type=int, default=1, help="processes converting records")
  parser.add_argument("--validate", action="store_true", help="check records and images, write nothing")
  args = parser.parse_args(argv)
  try:
    records = parse_records(args.records)
    roots = parse_pairs(args.image_root, "--image-root")
    annotations = parse_pairs(args.annotations, "--annotations")
    image_dirs = parse_pairs(args.image_dir, "--image-dir")
  except ValueError as e:
    parser.error(str(e))
  if args.validate:
    sources = m4seg.Sources(roots, annotations=annotations, image_dirs=image_dirs)
    return 1 if validate(records, sources, max_images=args.max_images) else 0
  if not args.out:
    parser.error("--out is required unless --validate")
  builder = m4seg.build(records, roots, args.out, annotations=annotations, image_dirs=image_dirs,
                        strict=args.strict, max_images=args.max_images, num_workers=args.workers)
  print(f"wrote {builder.data_dir} (skip summary: {builder.data_dir}/{m4seg.SKIPPED_FILE})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
