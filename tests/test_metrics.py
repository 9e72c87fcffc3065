"""Tests of prima_jax/evaluation/metrics.py: mask IoU against pycocotools, GLaMM's matching, Recall,
gIoU/cIoU, text metrics, METEOR (exact) and order-independent aggregation."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from prima_jax.data.example import GroundedExample
from prima_jax.evaluation import metrics
from prima_jax.evaluation.metrics import GroundedAnswer
from prima_jax.evaluation.text_similarity import LexicalSimilarity

SIM = LexicalSimilarity()


def box(shape, y0, y1, x0, x1) -> np.ndarray:
  m = np.zeros(shape, bool)
  m[y0:y1, x0:x1] = True
  return m


def answer(entries, text: str | None = None) -> GroundedAnswer:
  """GroundedAnswer from (phrase, image, mask) entries; the text is built from them unless given."""
  if text is None:
    text = " and ".join(f"<p> {p} </p> [SEG] (IMAGE{k + 1})" for p, k, _ in entries) or "nothing"
  phrases, images, masks = ([e[n] for e in entries] for n in range(3))
  return GroundedAnswer(text, phrases, images, masks)


def random_mask(rng, shape, density) -> np.ndarray:
  return rng.random(shape) < density


# --------------------------------------------------------------------------------------------------
# Mask IoU


@pytest.mark.parametrize("shape", [(1, 1), (7, 5), (33, 64), (120, 97)])
def test_mask_iou_matches_pycocotools(shape):
  rng = np.random.default_rng(hash(shape) % 2**32)
  masks = [random_mask(rng, shape, d) for d in (0.0, 0.01, 0.3, 0.5, 0.9, 1.0) for _ in range(2)]
  rles = [mask_utils.encode(np.asfortranarray(m.astype(np.uint8))) for m in masks]
  expected = mask_utils.iou(rles, rles, [0] * len(rles))  # [n, n]
  ours = np.array([[metrics.mask_iou(a, b) for b in masks] for a in masks])
  np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-12)
  # The whole matrix of one image's masks through iou_matrix (pycocotools: rows = detections).
  ref = answer([("x", 0, m) for m in masks])
  np.testing.assert_allclose(metrics.iou_matrix(ref, ref), expected, rtol=0, atol=1e-12)


def test_mask_iou_empty_and_numpy_formula():
  rng = np.random.default_rng(0)
  empty = np.zeros((9, 11), bool)
  assert metrics.mask_iou(empty, empty) == 0.0  # pycocotools' convention
  rle = mask_utils.encode(np.asfortranarray(empty.astype(np.uint8)))
  assert mask_utils.iou([rle], [rle], [0])[0, 0] == 0.0
  for _ in range(20):
    a, b = random_mask(rng, (9, 11), 0.4), random_mask(rng, (9, 11), 0.4)
    direct = np.logical_and(a, b).sum() / np.logical_or(a, b).sum()
    assert metrics.mask_iou(a, b) == pytest.approx(direct, abs=1e-15)
    assert metrics.mask_iou(a, empty) == 0.0
    assert metrics.mask_iou(a, a) == 1.0


def test_shape_mismatch_raises_only_within_one_image():
  a, b = box((4, 5), 0, 2, 0, 2), box((5, 4), 0, 2, 0, 2)
  with pytest.raises(ValueError, match="shapes differ"):
    metrics.mask_iou(a, b)
  with pytest.raises(ValueError, match="same image"):
    metrics.iou_matrix(answer([("x", 0, a)]), answer([("x", 0, b)]))
  # Different images may have different sizes: IoU 0.
  assert metrics.iou_matrix(answer([("x", 0, a)]), answer([("x", 1, b)])).tolist() == [[0.0]]


def test_wrong_image_gives_zero_iou_even_if_pixels_overlap():
  m = box((8, 8), 0, 4, 0, 4)
  pred, ref = answer([("cup_1", 1, m)]), answer([("cup_1", 0, m)])
  assert metrics.iou_matrix(pred, ref).tolist() == [[0.0]]
  stats = metrics.example_stats(pred, ref, similarity=SIM)
  assert stats["miou_score"] == 0.0 and stats["grounded"] == 1.0
  assert stats["recall_tp"] == 0.0 and stats["giou_sum"] == 0.0
  assert stats["ciou_inter"] == 0.0 and stats["ciou_union"] == 32.0  # both masks unmatched: 16 + 16
  assert stats["siou"] == 1.0 and stats["isiou"] == 0.0  # same phrase, wrong image
  assert stats["iss"] == 0.0  # image 1 and image 2 each named by one side only


def test_grounded_answer_validation_and_from_example():
  with pytest.raises(ValueError, match="one of each per"):
    GroundedAnswer("x", ["a"], [0, 1], [np.zeros((2, 2), bool)])
  with pytest.raises(ValueError, match="expected \\[height, width\\]"):
    GroundedAnswer("x", ["a"], [0], [np.zeros((2, 2, 1), bool)])
  with pytest.raises(ValueError, match="must be bool"):
    GroundedAnswer("x", ["a"], [0], [np.full((2, 2), 0.2, np.float32)])
  assert GroundedAnswer("x", ["a"], [0], [np.eye(2, dtype=np.uint8)]).masks[0].dtype == bool
  m = box((6, 7), 1, 3, 2, 5)
  images = [np.zeros((6, 7, 3), np.uint8)] * 2
  ex = GroundedExample("synthetic/val/0", "synthetic", "spatial", images, ["1", "2"], "q",
                       "The <p> cup_1 </p> [SEG] (IMAGE2).", ["cup_1"], [1], [m])
  ex.check()
  ref = GroundedAnswer.from_example(ex)
  assert ref.phrases == ["cup_1"] and ref.image_index == [1] and ref.masks[0].dtype == bool
  np.testing.assert_array_equal(ref.masks[0], m)


# --------------------------------------------------------------------------------------------------
# GLaMM matching and mIoU


def glamm_greedy(iou: np.ndarray) -> list[float]:
  """GLaMM's compute_miou loop as written (np.delete), returning the recorded IoUs."""
  iou, out = iou.copy(), []
  while iou.size > 0 and np.max(iou) > 0:
    i, j = np.unravel_index(np.argmax(iou, axis=None), iou.shape)
    out.append(iou[i, j])
    iou = np.delete(np.delete(iou, i, axis=0), j, axis=1)
  return out


def sorted_pairs_greedy(iou: np.ndarray) -> list[tuple[int, int]]:
  """The same matching written differently: scan all pairs by (-IoU, row, col), keep unused ones > 0."""
  used_r, used_c, out = set(), set(), []
  for v, i, j in sorted((-iou[i, j], i, j) for i in range(iou.shape[0]) for j in range(iou.shape[1])):
    if -v > 0 and i not in used_r and j not in used_c:
      out.append((i, j))
      used_r.add(i)
      used_c.add(j)
  return out


def test_greedy_match_equals_two_independent_implementations():
  rng = np.random.default_rng(1)
  for trial in range(300):
    r, c = rng.integers(0, 7, size=2)
    # Few distinct values force ties and zeros; every third trial is continuous.
    iou = rng.random((r, c)) if trial % 3 == 0 else rng.integers(0, 4, size=(r, c)) / 3
    pairs = metrics.greedy_match(iou)
    assert pairs == sorted_pairs_greedy(iou), iou
    assert [iou[i, j] for i, j in pairs] == glamm_greedy(iou), iou


def test_matching_hand_worked_cases():
  shape = (10, 10)
  a, b, c = box(shape, 0, 5, 0, 5), box(shape, 5, 10, 5, 10), box(shape, 0, 5, 5, 10)
  a_half = box(shape, 0, 5, 0, 3)  # IoU with a: 15/25 = 0.6
  ref = answer([("a", 0, a), ("b", 0, b)])

  # More predictions than references: the extra one neither lowers mIoU nor gIoU but lowers cIoU.
  pred = answer([("a", 0, a_half), ("b", 0, b), ("c", 0, c)])
  s = metrics.example_stats(pred, ref, similarity=SIM)
  assert s["miou_score"] == pytest.approx((1.0 + 0.6) / 2)
  assert s["giou_sum"] == pytest.approx(1.6)
  assert (s["ciou_inter"], s["ciou_union"]) == (15 + 25, 25 + 25 + 25)
  assert s["recall_tp"] == 2.0 and s["num_pred"] == 3.0 and s["num_ref"] == 2.0

  # Fewer predictions: mIoU is the mean over matched pairs only, gIoU counts the missing one as 0.
  pred = answer([("a", 0, a_half)])
  s = metrics.example_stats(pred, ref, similarity=SIM)
  assert s["miou_score"] == pytest.approx(0.6)
  assert s["giou_sum"] == pytest.approx(0.6)
  assert (s["ciou_inter"], s["ciou_union"]) == (15, 25 + 25)

  # No prediction: score 0, the example still counts in mIoU.
  s = metrics.example_stats(answer([]), ref, similarity=SIM)
  assert (s["miou_score"], s["grounded"], s["giou_sum"], s["recall_tp"]) == (0.0, 1.0, 0.0, 0.0)
  assert (s["ciou_inter"], s["ciou_union"]) == (0, 50)

  # No reference mask: left out of mIoU (grounded 0); predicted area still enters cIoU's union.
  s = metrics.example_stats(answer([("a", 0, a)]), answer([]), similarity=SIM)
  assert (s["grounded"], s["miou_score"], s["num_ref"]) == (0.0, 0.0, 0.0)
  assert (s["ciou_inter"], s["ciou_union"]) == (0, 25)
  r = metrics.aggregate([s])["overall"]
  assert math.isnan(r["mIoU"]) and math.isnan(r["Recall"]) and r["cIoU"] == 0.0

  # Empty masks: IoU 0, nothing matched.
  empty = np.zeros(shape, bool)
  s = metrics.example_stats(answer([("a", 0, empty)]), answer([("a", 0, empty)]), similarity=SIM)
  assert (s["miou_score"], s["giou_sum"], s["ciou_inter"], s["ciou_union"]) == (0.0, 0.0, 0, 0)


def test_matching_is_greedy_not_optimal_and_breaks_ties_row_major():
  # Greedy takes the 0.9 pair first although pairing (0,1),(1,0) would sum higher: GLaMM's rule.
  iou = np.array([[0.9, 0.8], [0.85, 0.0]])
  assert metrics.greedy_match(iou) == [(0, 0)]
  # Ties go to the first entry in row-major order.
  iou = np.array([[0.5, 0.7], [0.7, 0.5]])
  assert metrics.greedy_match(iou) == [(0, 1), (1, 0)]
  # A tie in masks: two identical predictions of one reference; the first prediction wins.
  m = box((6, 6), 0, 3, 0, 3)
  pred, ref = answer([("x", 0, m), ("x", 0, m)]), answer([("x", 0, m)])
  iou = metrics.iou_matrix(pred, ref)
  assert metrics.greedy_match(iou) == [(0, 0)]
  s = metrics.example_stats(pred, ref, similarity=SIM)
  assert s["miou_score"] == 1.0 and (s["ciou_inter"], s["ciou_union"]) == (9, 18)


# --------------------------------------------------------------------------------------------------
# Recall


def sorted_recall(iou: np.ndarray, text: np.ndarray) -> int:
  """Recall's matching written differently: scan pairs by (-IoU, row, col); stop at the first unused
  pair failing a threshold."""
  used_r, used_c, tp = set(), set(), 0
  for v, i, j in sorted((-iou[i, j], i, j) for i in range(iou.shape[0]) for j in range(iou.shape[1])):
    if i in used_r or j in used_c:
      continue
    if -v < 0.5 or text[i, j] < 0.5:
      break
    tp += 1
    used_r.add(i)
    used_c.add(j)
  return tp


def test_recall_matches_equals_independent_implementation():
  rng = np.random.default_rng(2)
  for _ in range(300):
    r, c = rng.integers(0, 6, size=2)
    iou = rng.integers(0, 5, size=(r, c)) / 4
    text = rng.integers(0, 3, size=(r, c)) / 2
    assert len(metrics.recall_matches(iou, text)) == sorted_recall(iou, text), (iou, text)


def test_recall_needs_both_iou_and_text():
  shape = (10, 10)
  a, b = box(shape, 0, 5, 0, 5), box(shape, 5, 10, 5, 10)
  ref = answer([("red chair_1", 0, a), ("table_2", 0, b)])
  # Perfect masks, phrases: one alike, one not -> 1 TP of 2 (mIoU still perfect).
  pred = answer([("red chair", 0, a), ("window", 0, b)])
  s = metrics.example_stats(pred, ref, similarity=SIM)
  assert s["recall_tp"] == 1.0 and s["miou_score"] == 1.0
  # GLaMM stops at the first failing pair: the highest-IoU pair has the wrong text, so the second
  # (which would pass) is never reached.
  pred = answer([("window", 0, b), ("red chair", 0, box(shape, 0, 5, 0, 4))])
  s = metrics.example_stats(pred, ref, similarity=SIM)
  assert s["recall_tp"] == 0.0
  # IoU below 0.5 with the right phrase: not a TP.
  pred = answer([("red chair", 0, box(shape, 0, 5, 0, 2))])  # IoU 0.4
  assert metrics.example_stats(pred, ref, similarity=SIM)["recall_tp"] == 0.0
  pred = answer([("red chair", 0, box(shape, 0, 5, 0, 3))])  # IoU 0.6
  assert metrics.example_stats(pred, ref, similarity=SIM)["recall_tp"] == 1.0


# --------------------------------------------------------------------------------------------------
# Text metrics


def test_strip_markup():
  text = ("The <p> desk_1's drawer_1 </p> [SEG] (IMAGE2) is next to <p>cup</p>[SEG](IMAGE1); the "
          "<p> desk_1's drawer_1 </p> (IMAGE2) again.")
  assert metrics.strip_markup(text) == "The desk_1's drawer_1 is next to cup ; the desk_1's drawer_1 again."


def test_text_metrics_hand_worked():
  m0, m1 = box((6, 6), 0, 3, 0, 3), box((6, 6), 3, 6, 3, 6)
  ref = answer([("cup_1", 0, m0), ("plate_1", 1, m1)])
  s = metrics.example_stats(ref, ref, similarity=SIM)
  assert (s["ss"], s["siou"], s["isiou"], s["iss"]) == (1.0, 1.0, 1.0, 1.0)
  # Both phrases named but both routed to image 1: S-IoU perfect, I-SIoU = 1 / (2 + 2 - 1).
  pred = answer([("cup", 0, m0), ("plate", 0, m1)])
  s = metrics.example_stats(pred, ref, similarity=SIM)
  assert s["siou"] == pytest.approx(1.0) and s["isiou"] == pytest.approx(1 / 3)
  # I-SS: image 1: "cup, plate" vs "cup_1"; image 2: only the reference -> 0.
  expected = SIM(["cup, plate"], ["cup_1"])[0, 0] / 2
  assert s["iss"] == pytest.approx(expected) and 0 < expected < 0.5
  # One phrase missing: S-IoU = 1 / (2 + 1 - 1).
  s = metrics.example_stats(answer([("cup", 0, m0)]), ref, similarity=SIM)
  assert s["siou"] == pytest.approx(0.5) and s["isiou"] == pytest.approx(0.5)
  assert s["iss"] == pytest.approx(0.5)
  # SS compares the answers without markup.
  pred = GroundedAnswer("A cup_1 and a plate_1", [], [], [])
  s = metrics.example_stats(pred, ref, similarity=SIM)
  assert s["ss"] == pytest.approx(SIM(["A cup_1 and a plate_1"], ["cup_1 and plate_1"])[0, 0])
  assert s["siou"] == 0.0 and s["isiou"] == 0.0 and s["iss"] == 0.0


def test_grounding_by_name_hand_worked():
  m = box((6, 6), 0, 3, 0, 3)
  ref = answer([("ball_1", 0, m), ("ball_1", 1, m), ("cup_2", 1, m)])
  s = metrics.example_stats(ref, ref, similarity=SIM)
  assert (s["named_tp"], s["routed_tp"], s["all_named"]) == (3, 3, 1)
  # Names compare as multisets: one "ball_1" named once is one of two; " Cup_2 " is cup_2.
  pred = answer([("ball_1", 1, m), (" Cup_2 ", 0, m), ("box_1", 1, m)])
  s = metrics.example_stats(pred, ref, similarity=SIM)
  assert (s["named_tp"], s["routed_tp"], s["all_named"]) == (2, 1, 0)
  agg = metrics.aggregate([s])["overall"]
  assert agg["Named"] == pytest.approx(200 / 3) and agg["Routed"] == pytest.approx(50.0)
  assert agg["All named"] == 0.0
  # Every name right, one routed wrong: all named, routing 2 / 3.
  pred = answer([("ball_1", 0, m), ("cup_2", 1, m), ("ball_1", 0, m)])
  s = metrics.example_stats(pred, ref, similarity=SIM)
  assert (s["named_tp"], s["routed_tp"], s["all_named"]) == (3, 2, 1)


def test_meteor_exact_hand_worked():
  # Banerjee & Lavie's example: 6 matches, 2 chunks, P = 1, R = 6/7.
  hyp, ref = "the president spoke to the audience", "the president then spoke to the audience"
  fmean = 10 * 1 * (6 / 7) / (6 / 7 + 9 * 1)
  assert metrics.meteor_exact(hyp, ref) == pytest.approx(fmean * (1 - 0.5 * (2 / 6) ** 3), abs=1e-12)
  assert metrics.meteor_exact("a b c d", "a b c d") == pytest.approx(1 - 0.5 / 4**3)
  assert metrics.meteor_exact("A cat", "a dog") == pytest.approx(
      (0.5 * 0.5 / (0.9 * 0.5 + 0.1 * 0.5)) * (1 - 0.5 * 1.0))
  assert metrics.meteor_exact("x y", "a b") == 0.0
  assert metrics.meteor_exact("", "a b") == 0.0
  # Every match its own chunk (reversed order): penalty 0.5 * 1^3.
  assert metrics.meteor_exact("c b a", "a b c") == pytest.approx(0.5 * 1.0)
  # Repeated words: the k-th occurrence is aligned with the k-th, (0,0) (1,2) (2,1): 3 chunks (the
  # alignment with fewest crossings, (0,2) (1,0) (2,1), would have 2).
  assert metrics.meteor_exact("a a b", "a b a") == pytest.approx(1 - 0.5 * (3 / 3) ** 3)


# --------------------------------------------------------------------------------------------------
# Aggregation


def random_pair(rng):
  n_img = int(rng.integers(1, 4))
  shapes = [tuple(int(v) for v in rng.integers(4, 12, size=2)) for _ in range(n_img)]
  words = ["cup", "plate", "chair", "desk_1's drawer_1", "red box"]

  def side(n):
    ks = [int(rng.integers(0, n_img)) for _ in range(n)]
    return answer([(str(rng.choice(words)), k, random_mask(rng, shapes[k], 0.4)) for k in ks])

  return side(int(rng.integers(0, 4))), side(int(rng.integers(0, 4)))


def test_aggregate_is_order_and_shard_independent():
  rng = np.random.default_rng(3)
  categories = ["spatial", "numerical", "functional", "open-ended", ""]
  stats, cats, multi = [], [], []
  for _ in range(60):
    pred, ref = random_pair(rng)
    stats.append(metrics.example_stats(pred, ref, similarity=SIM))
    cats.append(categories[int(rng.integers(0, len(categories)))])
    multi.append(len(set(ref.image_index)) >= 2)
  expected = metrics.aggregate(stats, cats)
  assert list(expected) == ["overall", "functional", "numerical", "open-ended", "spatial",
                            metrics.UNCATEGORISED, metrics.MULTI_IMAGE]
  # The multi-image row: the examples whose reference grounds two or more images.
  assert 0 < sum(multi) < len(stats)
  assert expected[metrics.MULTI_IMAGE] == metrics.aggregate([s for s, m in zip(stats, multi) if m])["overall"]
  for seed in range(5):
    order = np.random.default_rng(seed).permutation(len(stats))
    # Shards of any size gathered in any order: same concatenated multiset of per-example stats.
    shards = np.array_split(order, seed + 1)
    gathered = [i for shard in reversed(shards) for i in shard]
    got = metrics.aggregate([stats[i] for i in gathered], [cats[i] for i in gathered])
    assert got == expected  # exact: math.fsum is order-independent
  # Per-category rows equal the overall metrics of that category alone.
  for c in ("spatial", "functional"):
    sub = [s for s, k in zip(stats, cats) if k == c]
    assert expected[c] == metrics.aggregate(sub)["overall"]
  assert expected["overall"]["examples"] == 60.0
  assert sum(expected[c]["examples"] for c in expected if c not in ("overall", metrics.MULTI_IMAGE)) == 60.0


def test_aggregate_uses_fsum():
  # Plain summation would depend on the order for these values; fsum does not.
  s = [dict.fromkeys(metrics.STAT_KEYS, 1.0) for _ in range(3)]
  for d, v in zip(s, (1e16, 1.0, -1e16)):
    d["ss"] = v
  a = metrics.aggregate(s)["overall"]["SS"]
  b = metrics.aggregate(s[::-1])["overall"]["SS"]
  assert a == b == pytest.approx(100 / 3)


def test_aggregate_rejects_bad_input():
  with pytest.raises(ValueError, match="lacks"):
    metrics.aggregate([{"examples": 1.0}])
  s = metrics.example_stats(answer([]), answer([]), similarity=SIM)
  with pytest.raises(ValueError, match="2 categories for 1"):
    metrics.aggregate([s], ["a", "b"])


def test_perfect_prediction_and_format_table():
  rng = np.random.default_rng(4)
  stats, cats = [], []
  for n in range(6):
    _, ref = random_pair(rng)
    ref = answer([(p, k, m | (rng.random(m.shape) < 0.5) if not m.any() else m)
                  for p, k, m in zip(ref.phrases, ref.image_index, ref.masks)])
    stats.append(metrics.example_stats(ref, ref, similarity=SIM))
    cats.append("spatial" if n % 2 else "numerical")
  results = metrics.aggregate(stats, cats)
  for row in results.values():
    for name in ("mIoU", "Recall", "gIoU", "cIoU", "SS", "S-IoU", "I-SS", "I-SIoU"):
      assert math.isnan(row[name]) or row[name] == pytest.approx(100.0), (name, row)
    assert 0 < row["METEOR (exact)"] < 100
  table = metrics.format_table(results)
  lines = table.splitlines()
  print(table)
  assert lines[0].split()[:3] == ["split", "mIoU", "Recall"] and "METEOR (exact)" in lines[0]
  assert [line.split()[0] for line in lines[2:]] == ["overall", "numerical", "spatial", metrics.MULTI_IMAGE]
  assert len({len(line) for line in lines}) == 1  # aligned columns
  nan_row = metrics.format_table({"overall": metrics.aggregate([metrics.example_stats(
      answer([]), answer([]), similarity=SIM)])["overall"]})
  assert " - " in nan_row.splitlines()[2] + " "


@pytest.mark.parametrize("n_pred,n_ref", list(itertools.product([0, 1, 3], [0, 1, 3])))
def test_stats_bounds(n_pred, n_ref):
  rng = np.random.default_rng(10 * n_pred + n_ref)
  shape = (8, 9)
  pred = answer([("cup", int(rng.integers(0, 2)), random_mask(rng, shape, 0.5)) for _ in range(n_pred)])
  ref = answer([("cup", int(rng.integers(0, 2)), random_mask(rng, shape, 0.5)) for _ in range(n_ref)])
  s = metrics.example_stats(pred, ref, similarity=SIM)
  assert set(s) == set(metrics.STAT_KEYS)
  assert 0 <= s["recall_tp"] <= min(n_pred, n_ref)
  assert 0 <= s["giou_sum"] <= n_ref and 0 <= s["miou_score"] <= 1
  assert 0 <= s["ciou_inter"] <= s["ciou_union"]
  for k in ("ss", "siou", "isiou", "iss", "meteor"):
    assert 0 <= s[k] <= 1, k
  assert s["isiou"] <= s["siou"] + 1e-12
