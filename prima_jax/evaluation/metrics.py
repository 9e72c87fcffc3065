"""M⁴Seg metrics of grounded answers: mask metrics (GLaMM's mIoU and Recall, gIoU, cIoU) and text metrics.

A grounded answer (:class:`GroundedAnswer`, used for predictions and references alike) has one entry per
``[SEG]``: its phrase, the 0-based image it is routed to and a bool mask in that image's original frame.
Every metric is computed in two steps: :func:`example_stats` turns one (prediction, reference) pair into
sufficient statistics (floats), and :func:`aggregate` sums them with ``math.fsum`` (exactly rounded, hence
independent of example order and of how examples were sharded) and divides. Metrics are in percent.

Mask IoU. ``IoU(a, b) = |a ∧ b| / |a ∨ b|``, and 0 when both masks are empty (pycocotools' convention).
A prediction and a reference routed to different images have IoU 0 whatever their pixels.

Matching (GLaMM ``eval/gcg/evaluate.py::compute_miou``). Build the IoU matrix, predictions x references;
repeatedly take its highest entry while it is > 0, record the pair and delete its row and column. Ties go
to the first entry in row-major order (``np.argmax``), as in GLaMM.

Per split (sums over examples; "grounded" examples are those whose reference has at least one ``[SEG]``):

- **mIoU** (GLaMM): an example's score is the mean IoU of its matched pairs (unmatched masks on either
  side do not lower it), 0 when nothing matched; mIoU is the mean score over grounded examples
  (examples without reference masks are left out: GLaMM never has them).
- **Recall** (GLaMM ``find_best_matches``): true positives / reference phrases. Per example, on the IoU
  matrix references x predictions, repeatedly take the highest-IoU pair; stop when its IoU < 0.5 or the
  text similarity of its two phrases < 0.5 (even if a lower-IoU pair would pass); else count it and zero
  its row and column.
- **gIoU**: the mean, over all reference masks of the split, of the IoU of each reference mask with the
  prediction the matching paired it with (0 when unpaired). Extra predictions do not lower it.
- **cIoU**: Σ|p ∧ r| over matched pairs / (Σ|p ∨ r| over matched pairs + Σ area of unmatched predictions
  + Σ area of unmatched references), over the split: extra and missing masks both lower it.

Grounding by name (project definitions, for answers whose phrases are object names, as the synthetic
benchmark's are): phrases compare exactly after lowercasing and collapsing whitespace, as multisets.

- **Named**: reference phrases that the prediction also names (multiset intersection) / reference phrases.
- **Routed**: of those, the ones the prediction also routes to the same image (multiset intersection of
  (phrase, image) pairs) / named ones: the share of rightly named ``[SEG]`` sent to the right image.
- **All named**: grounded examples whose predicted phrases are exactly the reference's / grounded examples.

Text metrics (project definitions: the paper's SS, S-IoU, I-SS, I-SIoU are not published in detail).
``sim`` is the chosen :mod:`~prima_jax.evaluation.text_similarity` model with values clipped to [0, 1];
markup stripping removes ``<p>``, ``</p>``, ``[SEG]`` and ``(IMAGEk)`` and collapses whitespace.

- **SS**: mean over all examples of ``sim(predicted answer, reference answer)``, both markup-stripped.
- **S-IoU** (soft phrase IoU): with ``S = sim(reference phrases, predicted phrases)``, match phrases by the
  same greedy as mIoU on S (highest first while > 0); with ``m = Σ matched similarities``,
  ``S-IoU = m / (#ref + #pred - m)``: 1 when both sides name the same phrases, 0 when none is alike.
  Mean over grounded examples.
- **I-SIoU**: S-IoU with the similarity of phrases routed to different images set to 0.
- **I-SS**: per image k that the reference or the prediction routes a ``[SEG]`` to, compare the phrases
  routed to k (joined by ``", "`` in answer order): ``sim(pred_k, ref_k)``, 0 when one side has none;
  the example's score is the mean over those images. Mean over grounded examples.
- **METEOR (exact)**: METEOR (Banerjee & Lavie 2005) with exact unigram matches only (no stemming,
  synonyms or paraphrases), alpha=0.9, beta=3, gamma=0.5, on lowercased ``\\w+`` tokens of the
  markup-stripped answers; the k-th occurrence of a word in the prediction is aligned with its k-th
  occurrence in the reference. ``P = m/|pred|``, ``R = m/|ref|``, ``F = PR / (alpha P + (1-alpha) R)``,
  ``score = F (1 - gamma (chunks/m)^beta)`` (0 when m = 0); mean over all examples. Not comparable with
  pycocoevalcap's METEOR 1.5, which adds stem/synonym/paraphrase matches and other parameters.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
  from prima_jax.data.example import GroundedExample
  from prima_jax.evaluation.text_similarity import TextSimilarity

IOU_THRESHOLD = 0.5
TEXT_THRESHOLD = 0.5
METEOR_ALPHA, METEOR_BETA, METEOR_GAMMA = 0.9, 3.0, 0.5

# Sufficient statistics of one example (all floats; :func:`aggregate` sums each over examples).
STAT_KEYS = (
    "examples",        # 1
    "grounded",        # 1 if the reference has at least one [SEG], else 0
    "num_ref",         # reference [SEG] count (masks = phrases)
    "num_pred",        # predicted [SEG] count
    "miou_score",      # GLaMM's per-example score (0 when not grounded)
    "recall_tp",       # Recall true positives
    "giou_sum",        # Σ over reference masks of the IoU with its matched prediction
    "ciou_inter",      # Σ intersection of matched pairs
    "ciou_union",      # Σ union of matched pairs + areas of unmatched masks
    "ss",              # answer similarity
    "siou",            # soft phrase IoU (0 when not grounded)
    "isiou",           # image-aware soft phrase IoU (0 when not grounded)
    "iss",             # image-aware similarity (0 when not grounded)
    "meteor",          # METEOR (exact)
    "named_tp",        # reference phrases the prediction names too (multisets)
    "routed_tp",       # ... and routes to the same image
    "all_named",       # 1 if grounded and the predicted phrases are the reference's
    "ref_images",      # distinct images the reference grounds (>= 2: a multi-image answer)
)

# (name, numerator stat, denominator stat) of each metric; reported in percent.
METRICS = (
    ("mIoU", "miou_score", "grounded"),
    ("Recall", "recall_tp", "num_ref"),
    ("gIoU", "giou_sum", "num_ref"),
    ("cIoU", "ciou_inter", "ciou_union"),
    ("SS", "ss", "examples"),
    ("S-IoU", "siou", "grounded"),
    ("I-SS", "iss", "grounded"),
    ("I-SIoU", "isiou", "grounded"),
    ("METEOR (exact)", "meteor", "examples"),
    ("Named", "named_tp", "num_ref"),
    ("Routed", "routed_tp", "named_tp"),
    ("All named", "all_named", "grounded"),
)
COUNTS = (("examples", "examples"), ("grounded", "grounded"), ("ref masks", "num_ref"),
          ("pred masks", "num_pred"), ("TP", "recall_tp"))
UNCATEGORISED = "uncategorised"
# The row of examples whose reference grounds objects in two or more images (what needs SQuARE most).
MULTI_IMAGE = "multi-image"

_MARKUP = re.compile(r"</?p>|\[SEG\]|\(IMAGE\d+\)")
_METEOR_TOKEN = re.compile(r"\w+")


@dataclasses.dataclass
class GroundedAnswer:
  """An answer with one (phrase, image, mask) per ``[SEG]``, in answer order.

  Attributes:
    answer: the answer text with its grounding markup (``<p> phrase </p> [SEG] (IMAGEk)``).
    phrases: the phrase of each ``[SEG]`` ("" when none precedes it).
    image_index: the 0-based image each ``[SEG]`` is routed to (any int; -1 may mark an unrouted one).
    masks: bool [H_k, W_k] per ``[SEG]``, in the original frame of image ``image_index[i]``.
  """
  answer: str
  phrases: list[str]
  image_index: list[int]
  masks: list[np.ndarray]

  def __post_init__(self):
    self.phrases, self.image_index = list(self.phrases), [int(k) for k in self.image_index]
    for i, m in enumerate(self.masks):
      if not (np.asarray(m).dtype == bool or np.issubdtype(np.asarray(m).dtype, np.integer)):
        raise ValueError(f"GroundedAnswer: mask {i} has dtype {np.asarray(m).dtype}; masks must be bool "
                         "(threshold mask logits at 0 first)")
    self.masks = [np.asarray(m, dtype=bool) for m in self.masks]
    if not len(self.phrases) == len(self.image_index) == len(self.masks):
      raise ValueError(f"GroundedAnswer: {len(self.phrases)} phrases, {len(self.image_index)} image indices "
                       f"and {len(self.masks)} masks (one of each per [SEG])")
    for i, m in enumerate(self.masks):
      if m.ndim != 2:
        raise ValueError(f"GroundedAnswer: mask {i} has shape {m.shape}, expected [height, width]")

  @classmethod
  def from_example(cls, example: GroundedExample) -> GroundedAnswer:
    """The reference answer of a :class:`~prima_jax.data.example.GroundedExample`."""
    return cls(example.answer, example.phrases, example.mask_image, example.masks)

  def __len__(self) -> int:
    return len(self.masks)


def strip_markup(answer: str) -> str:
  """The answer without ``<p>``, ``</p>``, ``[SEG]``, ``(IMAGEk)``, with whitespace collapsed."""
  return " ".join(_MARKUP.sub(" ", answer).split())


# --------------------------------------------------------------------------------------------------
# Masks


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
  """IoU of two bool masks of the same shape; 0.0 when both are empty (pycocotools' convention)."""
  a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
  if a.shape != b.shape:
    raise ValueError(f"mask_iou: mask shapes differ: {a.shape} vs {b.shape}")
  union = np.count_nonzero(a | b)
  return np.count_nonzero(a & b) / union if union else 0.0


def _pair_counts(pred: GroundedAnswer, ref: GroundedAnswer) -> tuple[np.ndarray, np.ndarray]:
  """(intersection, union) pixel counts, int64 [num_pred, num_ref]; 0 for pairs on different images."""
  inter = np.zeros((len(pred), len(ref)), np.int64)
  union = np.zeros((len(pred), len(ref)), np.int64)
  for i, (ki, p) in enumerate(zip(pred.image_index, pred.masks)):
    for j, (kj, r) in enumerate(zip(ref.image_index, ref.masks)):
      if ki != kj:
        continue
      if p.shape != r.shape:
        raise ValueError(f"predicted mask {i} has shape {p.shape} but reference mask {j} of the same image "
                         f"(IMAGE{ki + 1}) has shape {r.shape}: masks must be in the image's original frame")
      inter[i, j] = np.count_nonzero(p & r)
      union[i, j] = np.count_nonzero(p | r)
  return inter, union


def _ratio(inter: np.ndarray, union: np.ndarray) -> np.ndarray:
  return np.divide(inter, union, out=np.zeros(inter.shape, np.float64), where=union > 0)


def iou_matrix(pred: GroundedAnswer, ref: GroundedAnswer) -> np.ndarray:
  """float64 [num_pred, num_ref] mask IoUs; 0 where the two ``[SEG]`` are routed to different images.

  Raises:
    ValueError: two masks of the same image differ in shape.
  """
  return _ratio(*_pair_counts(pred, ref))


def greedy_match(scores: np.ndarray) -> list[tuple[int, int]]:
  """GLaMM's one-to-one matching: repeatedly take the highest remaining entry while it is > 0 and
  remove its row and column; ties go to the first in row-major order. Returns (row, col) pairs in
  the order taken."""
  s = np.array(scores, dtype=np.float64, copy=True)
  pairs = []
  while s.size and s.max() > 0:
    i, j = np.unravel_index(np.argmax(s), s.shape)
    pairs.append((int(i), int(j)))
    s[i, :] = -np.inf
    s[:, j] = -np.inf
  return pairs


def recall_matches(iou_ref_pred: np.ndarray, text_ref_pred: np.ndarray, *,
                   iou_threshold: float = IOU_THRESHOLD,
                   text_threshold: float = TEXT_THRESHOLD) -> list[tuple[int, int]]:
  """GLaMM's Recall matching on [num_ref, num_pred] IoU and text-similarity matrices: repeatedly take
  the highest-IoU pair (first in row-major order on ties); stop when its IoU < ``iou_threshold`` or its
  text similarity < ``text_threshold``; else keep it and zero its row and column. Returns (ref, pred)."""
  iou = np.array(iou_ref_pred, dtype=np.float64, copy=True)
  if iou.shape != np.shape(text_ref_pred):
    raise ValueError(f"IoU matrix {iou.shape} and text similarity matrix {np.shape(text_ref_pred)} differ")
  pairs = []
  while iou.size:
    i, j = np.unravel_index(np.argmax(iou), iou.shape)
    if iou[i, j] < iou_threshold or text_ref_pred[i, j] < text_threshold:
      break
    pairs.append((int(i), int(j)))
    iou[i, :] = 0.0
    iou[:, j] = 0.0
  return pairs


# --------------------------------------------------------------------------------------------------
# Text


def _soft_iou(sims: np.ndarray) -> float:
  """m / (rows + cols - m) with m the sum of greedily matched entries of ``sims`` (in [0, 1])."""
  rows, cols = sims.shape
  if rows + cols == 0:
    return 0.0
  m = math.fsum(float(sims[i, j]) for i, j in greedy_match(sims))
  return m / (rows + cols - m)


def _per_image_text(answer: GroundedAnswer) -> dict[int, str]:
  """Image index -> phrases routed to it, joined by ", " in answer order."""
  out: dict[int, list[str]] = {}
  for phrase, k in zip(answer.phrases, answer.image_index):
    out.setdefault(k, []).append(phrase)
  return {k: ", ".join(v) for k, v in out.items()}


def meteor_exact(hypothesis: str, reference: str, *, alpha: float = METEOR_ALPHA, beta: float = METEOR_BETA,
                 gamma: float = METEOR_GAMMA) -> float:
  """Sentence METEOR with exact unigram matches only (see the module docstring), in [0, 1]."""
  hyp = _METEOR_TOKEN.findall(hypothesis.lower())
  ref = _METEOR_TOKEN.findall(reference.lower())
  ref_positions: dict[str, list[int]] = {}
  for r, w in enumerate(ref):
    ref_positions.setdefault(w, []).append(r)
  seen: dict[str, int] = {}
  alignment = []  # (hypothesis position, reference position), increasing in the hypothesis position
  for h, w in enumerate(hyp):
    k = seen.get(w, 0)
    if k < len(ref_positions.get(w, ())):
      alignment.append((h, ref_positions[w][k]))
    seen[w] = k + 1
  m = len(alignment)
  if m == 0:
    return 0.0
  chunks = 1 + sum(1 for (h0, r0), (h1, r1) in zip(alignment, alignment[1:])
                   if not (h1 == h0 + 1 and r1 == r0 + 1))
  precision, recall = m / len(hyp), m / len(ref)
  fmean = precision * recall / (alpha * precision + (1 - alpha) * recall)
  return fmean * (1 - gamma * (chunks / m) ** beta)


# --------------------------------------------------------------------------------------------------
# Per-example statistics and aggregation


def example_stats(pred: GroundedAnswer, ref: GroundedAnswer, *, similarity: TextSimilarity,
                  iou_threshold: float = IOU_THRESHOLD,
                  text_threshold: float = TEXT_THRESHOLD) -> dict[str, float]:
  """The sufficient statistics (:data:`STAT_KEYS`) of one example; see the module docstring.

  Args:
    pred: the predicted answer, phrases, routing and masks.
    ref: the reference.
    similarity: text similarity model (``text_similarity.make_similarity``).
    iou_threshold, text_threshold: Recall's thresholds (GLaMM: 0.5, 0.5).
  """
  inter, union = _pair_counts(pred, ref)
  iou = _ratio(inter, union)
  num_pred, num_ref = len(pred), len(ref)
  grounded = num_ref > 0

  pairs = greedy_match(iou)
  matched_iou = [float(iou[i, j]) for i, j in pairs]
  miou = math.fsum(matched_iou) / len(matched_iou) if matched_iou and grounded else 0.0
  pred_area = [int(np.count_nonzero(m)) for m in pred.masks]
  ref_area = [int(np.count_nonzero(m)) for m in ref.masks]
  matched_pred, matched_ref = {i for i, _ in pairs}, {j for _, j in pairs}
  ciou_inter = sum(int(inter[i, j]) for i, j in pairs)
  ciou_union = (sum(int(union[i, j]) for i, j in pairs)
                + sum(a for i, a in enumerate(pred_area) if i not in matched_pred)
                + sum(a for j, a in enumerate(ref_area) if j not in matched_ref))

  phrase_sim = np.asarray(similarity(ref.phrases, pred.phrases), np.float64).reshape(num_ref, num_pred)
  tp = len(recall_matches(iou.T, phrase_sim, iou_threshold=iou_threshold, text_threshold=text_threshold))
  phrase_sim = np.clip(phrase_sim, 0.0, 1.0)
  same_image = np.asarray(ref.image_index)[:, None] == np.asarray(pred.image_index)[None, :]
  siou = _soft_iou(phrase_sim) if grounded else 0.0
  isiou = _soft_iou(np.where(same_image, phrase_sim, 0.0)) if grounded else 0.0

  iss = 0.0
  if grounded:
    ref_text, pred_text = _per_image_text(ref), _per_image_text(pred)
    shared = sorted(set(ref_text) & set(pred_text))
    images = set(ref_text) | set(pred_text)
    if shared:
      sims = np.asarray(similarity([ref_text[k] for k in shared], [pred_text[k] for k in shared]), np.float64)
      iss = math.fsum(float(np.clip(sims[n, n], 0.0, 1.0)) for n in range(len(shared))) / len(images)

  norm = lambda phrase: " ".join(phrase.lower().split())
  pred_names = collections.Counter(map(norm, pred.phrases))
  ref_names = collections.Counter(map(norm, ref.phrases))
  named = sum((pred_names & ref_names).values())
  routed = sum((collections.Counter(zip(map(norm, pred.phrases), pred.image_index))
                & collections.Counter(zip(map(norm, ref.phrases), ref.image_index))).values())

  pred_plain, ref_plain = strip_markup(pred.answer), strip_markup(ref.answer)
  ss = float(np.clip(np.asarray(similarity([pred_plain], [ref_plain]), np.float64)[0, 0], 0.0, 1.0))

  return {
      "examples": 1.0,
      "grounded": float(grounded),
      "num_ref": float(num_ref),
      "num_pred": float(num_pred),
      "miou_score": miou,
      "recall_tp": float(tp),
      "giou_sum": math.fsum(matched_iou),
      "ciou_inter": float(ciou_inter),
      "ciou_union": float(ciou_union),
      "ss": ss,
      "siou": siou,
      "isiou": isiou,
      "iss": iss,
      "meteor": meteor_exact(pred_plain, ref_plain),
      "named_tp": float(named),
      "routed_tp": float(routed),
      "all_named": float(grounded and pred_names == ref_names),
      "ref_images": float(len(set(ref.image_index))),
  }


def _metrics(stats: Sequence[dict[str, float]]) -> dict[str, float]:
  totals = {k: math.fsum(s[k] for s in stats) for k in STAT_KEYS}
  out = {name: 100.0 * totals[num] / totals[den] if totals[den] else math.nan for name, num, den in METRICS}
  out.update({name: totals[key] for name, key in COUNTS})
  return out


def aggregate(stats: Sequence[dict[str, float]],
              categories: Sequence[str] | None = None) -> dict[str, dict[str, float]]:
  """Metrics in percent (:data:`METRICS`) and counts (:data:`COUNTS`), overall and per category.

  Args:
    stats: :func:`example_stats` of every example (any order, e.g. gathered from several hosts).
    categories: the question category of each example ("" -> ``"uncategorised"``), or None.

  Returns:
    ``{"overall": {...}, "<category>": {...}, ..., "multi-image": {...}}`` with categories sorted by
    name; ``multi-image`` (when there are any) holds the examples whose reference grounds two or more
    images. A metric whose
    denominator is 0 (e.g. no grounded example) is NaN. Sums use ``math.fsum``, so the result is
    identical for any order or sharding of ``stats``.
  """
  stats = list(stats)
  for n, s in enumerate(stats):
    missing = [k for k in STAT_KEYS if k not in s]
    if missing:
      raise ValueError(f"aggregate: stats[{n}] lacks {missing} (make them with example_stats)")
  results = {"overall": _metrics(stats)}
  if categories is not None:
    categories = list(categories)
    if len(categories) != len(stats):
      raise ValueError(f"aggregate: {len(categories)} categories for {len(stats)} examples")
    names = [c or UNCATEGORISED for c in categories]
    for c in sorted(set(names)):
      results[c] = _metrics([s for s, n in zip(stats, names) if n == c])
  multi = [s for s in stats if s["ref_images"] >= 2]
  if multi:
    results[MULTI_IMAGE] = _metrics(multi)
  return results


def format_table(results: dict[str, dict[str, float]]) -> str:
  """A text table: one row per entry of ``results`` (overall first), metrics then counts as columns."""
  columns = [name for name, _, _ in METRICS] + [name for name, _ in COUNTS]
  metric_names = {name for name, _, _ in METRICS}
  rows = [[row] + [("-" if math.isnan(v) else f"{v:.2f}") if name in metric_names else f"{v:.0f}"
                   for name in columns for v in [values.get(name, math.nan)]]
          for row, values in results.items()]
  header = ["split"] + columns
  widths = [max(len(r[c]) for r in rows + [header]) for c in range(len(header))]
  fmt = lambda r: "  ".join(v.ljust(w) if c == 0 else v.rjust(w) for c, (v, w) in enumerate(zip(r, widths)))
  return "\n".join([fmt(header), "  ".join("-" * w for w in widths)] + [fmt(r) for r in rows])
