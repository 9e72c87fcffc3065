"""TFDS builder for M⁴Seg-format data (real M⁴Seg or the synthetic benchmark), written as ArrayRecord.

No TensorFlow: features are strings/bytes and integer scalars only (encoded image files are stored as
raw bytes, masks as COCO compressed RLE), so preparing (``download_and_prepare``) and reading
(``as_data_source`` / ``tfds.data_source``) never import TF. ``as_dataset()`` would need TF: don't.

Configuration is by constructor arguments (reading needs none of them)::

  builder = M4Seg(data_dir=OUT,
                  records={"train": ["Part_Segm/x_train.json"], "test": ["Part_Segm/x_test.json"]},
                  image_roots={"paco_lvis": "Part_Segm/paco_lvis", "synthetic": "DIR/synthetic"},
                  annotations={}, image_dirs={}, strict=False, max_images=5, num_workers=1,
                  fields={"q": "question"}, budget={"segs": 16})
  builder.download_and_prepare()

``records`` names JSON or parquet files (a wildcard in the file name is expanded; ``fields`` maps our
record fields to other column names, ``records.field_table``). ``image_roots`` maps a record's
``dataset_name`` to the source's folder in the original layout (``records.SOURCES``: annotation file
and image directory per split, ADE20K's test split reads val); ``annotations`` / ``image_dirs``
override those templates per source (``{split}``, ``{image_split}`` allowed; relative to the root).
Inputs may be local or object-store URLs (``etils.epath``); the data dir must be local. Before any
conversion every record file is read and every annotation file and image directory the records need
is checked: all problems raise one ``SetupError``, one line each. ``num_workers`` > 1 converts
records (decoding every image to check it, the slow part) in that many spawned processes, in order.
Bad records are skipped and counted by reason; the summary and the text-side lengths of the kept
examples (``records.LengthStats``, thresholds ``budget``) are printed per split and saved as
``skipped.json`` next to the data (``strict=True`` raises on the first bad record).

Stored example (the data source returns it as nested dicts/lists of bytes and numpy scalars)::

  example_id, source, category, question, answer: text
  images: sequence of {encoded: bytes (the original file), id: text, height: int32, width: int32}
  segs:   sequence of {rle: bytes (COCO compressed RLE counts), height: int32, width: int32,
                       phrase: text, image_index: int32 (0-based)}   # one per [SEG], answer order
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import json
import multiprocessing
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from prima_jax import paths
from prima_jax.data import records as rec
from prima_jax.data.example import GroundedExample

SKIPPED_FILE = "skipped.json"


def _text() -> tfds.features.Text:
  return tfds.features.Text()


def _bytes() -> tfds.features.Tensor:
  return tfds.features.Tensor(shape=(), dtype=np.object_)


def _int() -> tfds.features.Tensor:
  return tfds.features.Tensor(shape=(), dtype=np.int32)


class BuildError(ValueError):
  """A build stopped by its records: the first bad one under ``strict``, or a split left without
  examples (TFDS cannot write an empty split). Nothing is written."""


class Sources:
  """Per-source annotation indices and image directories, resolved lazily per split.

  Args:
    image_roots: ``dataset_name`` -> the source's root folder (see ``records.SOURCES``), local or a URL.
    annotations: optional per-source override of the annotation file template.
    image_dirs: optional per-source override of the image directory template.
  """

  def __init__(self, image_roots: Mapping[str, str | os.PathLike], *,
               annotations: Mapping[str, str] | None = None, image_dirs: Mapping[str, str] | None = None):
    self.image_roots = {k: str(v) for k, v in image_roots.items()}
    self.annotations = dict(annotations or {})
    self.image_dirs = dict(image_dirs or {})
    self._cache: dict[tuple[str, str], tuple[rec.ImageIndex, str]] = {}

  def layout(self, name: str) -> rec.SourceLayout:
    """The source's layout with the ``--annotations`` / ``--image_dir`` overrides applied (a source
    without a default layout has no annotation template and its images in the root itself)."""
    base = rec.SOURCES.get(name, rec.SourceLayout("", "."))
    return rec.SourceLayout(self.annotations.get(name, base.annotations),
                            self.image_dirs.get(name, base.images), base.split_alias, base.image_split)

  def locate(self, name: str, split: str) -> tuple[epath.Path, epath.Path]:
    """(annotation file, image directory) of a configured source for a split; SetupError without a layout."""
    layout = self.layout(name)
    if not layout.annotations:
      raise rec.SetupError(f"source {name!r} has no default layout: set its annotation file with "
                           f"--annotations {name}=TEMPLATE (and its image directory with --image_dir "
                           f"{name}=TEMPLATE; default: the --image_root itself)")
    return layout.paths(self.image_roots[name], split, what=f"--image_root {name}")

  def check(self, needed: Mapping[str, Iterable[Any]]) -> list[str]:
    """One line per missing annotation file or image directory of the configured sources that
    ``needed`` ({split: source names of its records}) uses, and per annotation file that is not
    COCO-style JSON (each is read here, and kept); each names the path, the source, its split(s) and
    the flags that set it. Sources without an image root are not checked."""
    missing: dict[tuple[str, str, str], list[str]] = {}
    problems: list[str] = []
    for split, names in needed.items():
      for name in sorted({n for n in names if isinstance(n, str) and n in self.image_roots}):
        try:
          annotation_path, image_dir = self.locate(name, split)
        except rec.SetupError as e:
          problems += [p for p in e.problems if p not in problems]
          continue
        found = annotation_path.is_file()
        if not found:
          missing.setdefault((name, "annotation file", str(annotation_path)), []).append(split)
        if not image_dir.is_dir():
          missing.setdefault((name, "image directory", str(image_dir)), []).append(split)
        elif found:  # Read now (and kept for the conversion): a bad file stops the run before any work.
          try:
            self.get(name, split)
          except rec.SetupError as e:
            problems += [f"source {name!r} (split {split}): {p}" for p in e.problems]
    for (name, kind, path), splits in missing.items():
      layout = self.layout(name)
      flag, template = ("--annotations", layout.annotations) if kind == "annotation file" else (
          "--image_dir", layout.images)
      if paths.url_scheme(template) is None and not template.startswith("/"):
        root = paths.resolve(self.image_roots[name], what=f"--image_root {name}")
        where = f"template {template!r} under --image_root {name}={root}"
      else:
        where = f"{flag} {name}={template}"
      problems.append(f"source {name!r} ({'split' if len(splits) == 1 else 'splits'} {', '.join(splits)}): "
                      f"{kind} {path} does not exist ({where}); set it with {flag} {name}=TEMPLATE "
                      f"or --image_root {name}=DIR")
    return problems

  def get(self, name: str, split: str) -> tuple[rec.ImageIndex, str]:
    """(annotation index, image directory) of a source for a split.

    Raises:
      SkipExample: unknown_source, when ``name`` has no image root.
      SetupError: the source has no layout, or its annotation file is missing or not COCO-style.
    """
    key = (name, split)
    if key not in self._cache:
      if name not in self.image_roots:
        raise rec.SkipExample(rec.UNKNOWN_SOURCE, f"no image root for source {name!r} "
                                                  f"(configured: {sorted(self.image_roots)})")
      annotation_path, image_dir = self.locate(name, split)
      self._cache[key] = (rec.ImageIndex.from_file(annotation_path), str(image_dir))
    return self._cache[key]

  def convert(self, record: Any, index: int, split: str, *,
              max_images: int = rec.DEFAULT_MAX_IMAGES) -> tuple[GroundedExample, list[bytes]]:
    """One record -> (example, encoded image files); raises SkipExample."""
    problems = rec.validate_record(record, index, max_images=max_images)
    name = record.get("dataset_name") if isinstance(record, dict) else None
    if problems or not isinstance(name, str):  # Let the structural check name the problem.
      image_index, image_dir = rec.ImageIndex({}), "."
    else:
      image_index, image_dir = self.get(name, split)
    return rec.convert_record(record, index, image_index=image_index, image_root=image_dir,
                              max_images=max_images, split=split)


Inputs = dict[str, list[tuple[str, list[Any]]]]  # split -> [(record file, its records)]


def load_inputs(records: Mapping[str, Sequence[str | os.PathLike]], sources: Sources, *,
                fields: Mapping[str, str] | None = None) -> Inputs:
  """Reads every record file (wildcards in file names expanded), then checks every annotation file
  and image directory their records need, before any conversion.

  Raises:
    SetupError: every problem found (a record file missing, unreadable or without the expected
      columns; a missing annotation file or image directory), one per line.
  """
  table = rec.field_table(fields)
  problems: list[str] = []
  inputs: Inputs = {}
  for split, patterns in records.items():
    inputs[split] = []
    for pattern in patterns:
      try:
        inputs[split] += [(str(f), rec.load_records(f, fields=table)) for f in rec.record_files(pattern)]
      except rec.SetupError as e:
        problems += e.problems
  problems += sources.check(source_names(inputs))
  if problems:
    raise rec.SetupError(problems)
  return inputs


def source_names(inputs: Inputs) -> dict[str, set[Any]]:
  """{split: the ``dataset_name`` values of its records}."""
  return {split: {r.get("dataset_name") for _, rs in files for r in rs if isinstance(r, dict)}
          for split, files in inputs.items()}


def unconfigured(inputs: Inputs, sources: Sources) -> dict[str, list[str]]:
  """{source name: the splits whose records name it} for the sources without an image root."""
  splits: dict[str, list[str]] = {}
  for split, names in source_names(inputs).items():
    for name in sorted(n for n in names if isinstance(n, str) and n not in sources.image_roots):
      splits.setdefault(name, []).append(split)
  return dict(sorted(splits.items()))


class M4Seg(tfds.core.GeneratorBasedBuilder):
  """M⁴Seg: multi-image reasoning segmentation QA with one mask per ``[SEG]`` (docs/data.md)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First version: encoded original images, converted answers, RLE masks."}

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # TFDS 4.9.10 resolves this through `importlib_resources`, a package it does not install on
    # Python >= 3.9 (ModuleNotFoundError in download_and_prepare); this file is the answer anyway.
    return epath.Path(__file__)

  def __init__(self, *, records: Mapping[str, Sequence[str | os.PathLike]] | None = None,
               image_roots: Mapping[str, str | os.PathLike] | None = None,
               annotations: Mapping[str, str] | None = None, image_dirs: Mapping[str, str] | None = None,
               strict: bool = False, max_images: int = rec.DEFAULT_MAX_IMAGES, num_workers: int = 1,
               fields: Mapping[str, str] | None = None, budget: Mapping[str, int] | None = None, **kwargs):
    self._records = {split: [str(p) for p in files] for split, files in (records or {}).items()}
    self.sources = Sources(image_roots or {}, annotations=annotations, image_dirs=image_dirs)
    self._strict = strict
    self._max_images = max_images
    self._num_workers = num_workers
    self._fields = rec.field_table(fields)
    self._budget = rec.budget_table(budget)
    self._inputs: Inputs | None = None
    self.skipped: dict[str, dict[str, Any]] = {}
    kwargs.setdefault("file_format", "array_record")
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="Multi-image grounded QA in the M⁴Seg format: 1..5 images, a question, an answer "
                    "with <p> phrase </p> [SEG] (IMAGEk) mentions and one RLE mask per [SEG].",
        features=tfds.features.FeaturesDict({
            "example_id": _text(),
            "source": _text(),
            "category": _text(),
            "question": _text(),
            "answer": _text(),
            "images": tfds.features.Sequence({"encoded": _bytes(), "id": _text(), "height": _int(),
                                              "width": _int()}),
            "segs": tfds.features.Sequence({"rle": _bytes(), "height": _int(), "width": _int(),
                                            "phrase": _text(), "image_index": _int()}),
        }),
        homepage="https://plan-lab.github.io/projects/prima",
        citation="arXiv:2412.15209",
    )

  def prepare_inputs(self) -> None:
    """Reads the record files and checks the sources' paths (``load_inputs``: SetupError listing every
    problem); ``download_and_prepare`` calls it when not called before."""
    if not self._records:
      raise ValueError("M4Seg needs records={split: [record files]} to prepare data")
    if self._inputs is None:
      self._inputs = load_inputs(self._records, self.sources, fields=self._fields)
      for name, splits in unconfigured(self._inputs, self.sources).items():
        print(f"[m4seg] note: no --image_root for source {name!r} ({', '.join(splits)}): its records are "
              f"skipped ({rec.UNKNOWN_SOURCE})")

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing is downloaded.
    self.prepare_inputs()
    return {split: self._generate_examples(split) for split in self._inputs}

  def _generate_examples(self, split: str) -> Iterator[tuple[str, dict[str, Any]]]:
    counts: collections.Counter[str] = collections.Counter()
    details: list[dict[str, Any]] = []
    lengths = rec.LengthStats()
    index = kept = 0
    jobs = [(path, i, record, split) for path, records in self._inputs.pop(split)
            for i, record in enumerate(records)]
    if self._num_workers > 1:  # Load annotation indices once here; workers receive the small tables.
      for name in {r.get("dataset_name") for _, _, r, _ in jobs if isinstance(r, dict)}:
        if isinstance(name, str) and name in self.sources.image_roots:
          self.sources.get(name, split)
    with _converter(self.sources, self._max_images, self._num_workers) as convert:
      for path, i, result in convert(jobs):
        if isinstance(result, rec.SkipExample):
          if self._strict:
            raise BuildError(f"{path} record {i} ({split} example {index}): {result} (--strict)") from None
          counts[result.reason] += 1
          details.append({"file": path, "record": i, "reason": result.reason, "detail": result.detail})
        else:
          kept += 1
          lengths.add(len(result["images"]), len(result["segs"]), result["question"], result["answer"])
          yield result["example_id"], result
        index += 1
    if not kept:
      reasons = ", ".join(f"{k}={v}" for k, v in sorted(counts.items())) or "none"
      raise BuildError(f"split {split!r}: none of its {index} record(s) became an example (skipped: "
                       f"{reasons}; the details with --validate); nothing was written")
    self.skipped[split] = {"records": index, "kept": kept, "skipped": dict(counts), "details": details,
                           "lengths": lengths.summary(self._budget)}
    print(format_summary(split, self.skipped[split]))
    print(rec.format_lengths(split, self.skipped[split]["lengths"]))
    paths.write_text_atomic(epath.Path(self.data_dir) / SKIPPED_FILE, json.dumps(self.skipped, indent=1))


# Conversion of (path, i, record, split) jobs -> (path, i, features | SkipExample), in order, in this
# process or in a pool of worker processes (images are decoded to check them: the slow part).
_WORKER: dict[str, Any] = {}


def _init_worker(sources: Sources, max_images: int) -> None:
  _WORKER.update(sources=sources, max_images=max_images)


def _convert_job(job: tuple[str, int, Any, str, int]) -> tuple[str, int, Any]:
  path, i, record, split, index = job
  try:
    example, encoded = _WORKER["sources"].convert(record, index, split, max_images=_WORKER["max_images"])
  except rec.SkipExample as e:
    return path, i, e
  return path, i, to_features(example, encoded)


def _convert_chunk(jobs: list[tuple[str, int, Any, str, int]]) -> list[tuple[str, int, Any]]:
  return [_convert_job(job) for job in jobs]


@contextlib.contextmanager
def _converter(sources: Sources, max_images: int, num_workers: int, chunk: int = 16):
  """Yields ``convert(jobs) -> iterator of results``, in job order; bounded look-ahead with workers."""
  def numbered(jobs):
    return ((path, i, record, split, n) for n, (path, i, record, split) in enumerate(jobs))

  if num_workers <= 1:
    _init_worker(sources, max_images)
    yield lambda jobs: map(_convert_job, numbered(jobs))
    return
  # ProcessPoolExecutor fails fast (BrokenProcessPool) where multiprocessing.Pool would respawn
  # crashing workers forever.
  with concurrent.futures.ProcessPoolExecutor(num_workers, multiprocessing.get_context("spawn"),
                                              _init_worker, (sources, max_images)) as pool:
    def convert(jobs):
      pending: collections.deque = collections.deque()
      batch: list = []
      for job in numbered(jobs):
        batch.append(job)
        if len(batch) == chunk:
          pending.append(pool.submit(_convert_chunk, batch))
          batch = []
          if len(pending) >= 4 * num_workers:
            yield from pending.popleft().result()
      if batch:
        pending.append(pool.submit(_convert_chunk, batch))
      while pending:
        yield from pending.popleft().result()

    yield convert


def format_summary(split: str, summary: Mapping[str, Any]) -> str:
  """One line per split: kept/total and skip counts by reason."""
  reasons = ", ".join(f"{k}={v}" for k, v in sorted(summary["skipped"].items())) or "none"
  return f"[m4seg] {split}: kept {summary['kept']} of {summary['records']} records; skipped: {reasons}"


def to_features(example: GroundedExample, encoded: Sequence[bytes]) -> dict[str, Any]:
  """GroundedExample (+ its images' file bytes) -> the stored feature dict."""
  masks = [rec.encode_mask(m) for m in example.masks]
  return {
      "example_id": example.example_id,
      "source": example.source,
      "category": example.category,
      "question": example.question,
      "answer": example.answer,
      "images": [{"encoded": data, "id": image_id, "height": img.shape[0], "width": img.shape[1]}
                 for data, image_id, img in zip(encoded, example.image_ids, example.images)],
      "segs": [{"rle": rle, "height": m.shape[0], "width": m.shape[1], "phrase": phrase, "image_index": k}
               for rle, m, phrase, k in zip(masks, example.masks, example.phrases, example.mask_image)],
  }


def _str(value: Any) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def decode_example(raw: Mapping[str, Any], *, decode_images: bool = True) -> GroundedExample:
  """What the data source returns for one index -> GroundedExample (images decoded with PIL).

  Images: uint8 [H_k, W_k, 3] RGB; masks: bool [H_k, W_k] in the frame of image ``mask_image[i]``.
  ``decode_images=False`` (every tower's features cached) gives each image as a zero-copy placeholder
  of its stored shape instead: its geometry without the cost of decoding it.
  """
  images, segs = raw["images"], raw["segs"]
  if decode_images:
    pixels = [rec.decode_image(bytes(data)) for data in images["encoded"]]
  else:
    pixels = [np.broadcast_to(np.zeros(3, np.uint8), (int(h), int(w), 3))
              for h, w in zip(images["height"], images["width"])]
  example = GroundedExample(
      example_id=_str(raw["example_id"]),
      source=_str(raw["source"]),
      category=_str(raw["category"]),
      images=pixels,
      image_ids=[_str(i) for i in images["id"]],
      question=_str(raw["question"]),
      answer=_str(raw["answer"]),
      phrases=[_str(p) for p in segs["phrase"]],
      mask_image=[int(k) for k in segs["image_index"]],
      masks=[rec.decode_mask(bytes(rle), int(h), int(w))
             for rle, h, w in zip(segs["rle"], segs["height"], segs["width"])])
  return example


def data_source(data_dir: str | os.PathLike, split: str):
  """The random-access ArrayRecord source of a prepared split (``len()``, ``[i]``) for ``decode_example``."""
  local = paths.local_only(data_dir, what="data_dir", why="the ArrayRecord reader")
  return M4Seg(data_dir=local).as_data_source(split)


def build(records: Mapping[str, Sequence[str | os.PathLike]], image_roots: Mapping[str, str | os.PathLike],
          data_dir: str | os.PathLike, *, annotations: Mapping[str, str] | None = None,
          image_dirs: Mapping[str, str] | None = None, strict: bool = False,
          max_images: int = rec.DEFAULT_MAX_IMAGES, num_workers: int = 1,
          fields: Mapping[str, str] | None = None, budget: Mapping[str, int] | None = None,
          overwrite: bool = False, what: str = "data_dir") -> M4Seg:
  """Prepares the splits into ``data_dir/m4_seg/1.0.0``; returns a builder reading the result, with the
  build's ``.skipped`` summary and its ``.sources`` (the image roots, annotation indexes and image
  directories the records were resolved against).

  Record files, annotation files and images may be local or object-store URLs; ``data_dir`` must be
  local (ArrayRecord writes local files only). ``fields`` maps our record fields to the files' column
  names (``records.field_table``); ``budget`` sets the thresholds of the per-split length summary
  (``records.DEFAULT_BUDGET``).

  The build is atomic: it is written in a scratch directory ``data_dir/.m4_seg.tmp-XXXXXXXX`` and
  renamed to ``data_dir/m4_seg`` when every split is complete (a failed or killed build leaves
  ``data_dir/m4_seg`` as it was). An existing ``data_dir/m4_seg`` is replaced whole with
  ``overwrite``, else refused; other files in ``data_dir`` are left alone. Scratch directories of
  killed builds are removed first (those whose process still runs are kept), one printed line each.

  Raises:
    SetupError: a record file, annotation file or image directory is missing or unreadable, or a
      record file lacks a column (all problems, one per line, before any conversion).
    PathError: ``data_dir`` is a URL or a file, or a URL's client is not installed.
    FileExistsError: ``data_dir/m4_seg`` exists and ``overwrite`` is False (nothing is read or written).
  """
  local = epath.Path(paths.local_only(data_dir, what=what, why="the ArrayRecord writer that TFDS uses"))
  if local.exists() and not local.is_dir():
    raise paths.PathError(f"{what}={data_dir} is a file, not a directory")
  target = local / M4Seg.name
  if target.exists() and not overwrite:
    raise FileExistsError(f"{what}={data_dir} already holds an M4Seg build ({target}); pass --overwrite "
                          "(overwrite=True) to replace it")
  for line in paths.clean_leftovers(target):
    print(f"[m4seg] {line}")
  scratch = paths.scratch_dir(target)
  builder = M4Seg(records=records, image_roots=image_roots, annotations=annotations, image_dirs=image_dirs,
                  strict=strict, max_images=max_images, num_workers=num_workers, fields=fields, budget=budget,
                  data_dir=os.fspath(scratch))
  builder.prepare_inputs()  # Problems with the inputs raise before anything is written.
  with paths.staged_dir(target, scratch):
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  built = M4Seg(data_dir=os.fspath(local))
  built.skipped, built.sources = builder.skipped, builder.sources
  return built


def load_skipped(data_dir: str | os.PathLike) -> dict[str, Any]:
  """The skip summary saved next to a prepared dataset."""
  local = paths.local_only(data_dir, what="data_dir", why="the ArrayRecord reader")
  return json.loads((epath.Path(M4Seg(data_dir=local).data_dir) / SKIPPED_FILE).read_text())
