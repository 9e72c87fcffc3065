"""Image-side pretraining on the synthetic benchmark: what each image shows, learnt from its annotations.

PRIMA starts from pretrained towers (EVA-CLIP's ViT, BLIP-2's Q-Former) that already tell objects apart.
The demo's towers start from random weights, and trained only through the LLM's answers they never learn
to: the LLM then learns to answer without reading the images (docs/demo.md). This stage stands in for
the missing pretraining: the image side (EVA -> SQuARE -> Q-Former -> language projection), its
Q-Former reading each record's question as in training (the instruction-aware queries share
self-attention with it), with one linear layer over each image's query tokens side by side, is trained
on per-image multi-label targets from the benchmark's COCO annotations (:data:`LABEL_GROUPS`): which of
the six colours and six classes of objects the image shows, which (colour, class) pairs, whether it
shows at least two or three of a class, and whether an object of a class is centred in the left or the
top half.
These are what an answer names, numbers, counts and compares. ``train.image_pretraining`` runs it before
a fresh run's first step (:func:`pretrain`); ``python -m prima_jax.tools.vision_probe`` runs it alone and
reports.

The val split is scored per label group: the share of (image, label) decisions that are right, next to
the majority baseline (each label's more frequent value on the train split), and the share of images with
the whole group right; and the share of images with every label right. The loop is its own (Adam,
sigmoid cross-entropy): it needs no tokenizer, prompt or LLM and runs a hundred steps in seconds.

``data_dir``: a directory written by ``python -m prima_jax.data.synthetic --out DIR`` (a demo run's is
``WORKDIR/data/source``); the standard variant's ``train`` and ``val`` splits.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath
from flax import nnx
from PIL import Image

from prima_jax.data import synthetic
from prima_jax.data.preprocess import eva_resize
from prima_jax.models.layers import init_rngs
from prima_jax.models.prima import Prima
from prima_jax.training.partition import path_str

COLOURS = tuple(synthetic.COLORS)
CLASSES = tuple(synthetic.CLASSES)
# What an image's labels say, group by group (parts do not count as objects): each group's labels are
# named "{group}:{what}". An answer names an object by colour and class, numbers instances left to right,
# counts them and compares positions, so the targets ask for each of these.
LABEL_GROUPS = {
    "colour": [f"colour:{c}" for c in COLOURS],                      # an object of this colour
    "class": [f"class:{k}" for k in CLASSES],                        # an object of this class
    "colour_class": [f"colour_class:{c} {k}" for c in COLOURS for k in CLASSES],  # a {c} {k}
    "count": [f"count:{k}>={n}" for n in (2, 3) for k in CLASSES],    # at least n objects of class k
    "side": [f"side:{k} {s}" for s in ("left", "top") for k in CLASSES],  # a {k} centred in that half
}
LABELS = tuple(label for group in LABEL_GROUPS.values() for label in group)
GROUPS = {name: slice(end - len(group), end) for (name, group), end
          in zip(LABEL_GROUPS.items(), np.cumsum([len(g) for g in LABEL_GROUPS.values()]))}
THROUGH = ("image_tokens", "eva_features")
# The image side's top-level modules in Prima: what pretraining trains and hands over.
IMAGE_SIDE = ("vision", "square", "qformer", "language_projection")


class ProbeDataError(ValueError):
  """A benchmark file the probe cannot read (the message names the file and the record)."""


def _read_json(path: epath.Path) -> Any:
  try:
    return json.loads(path.read_text())
  except (OSError, json.JSONDecodeError) as e:
    raise ProbeDataError(f"{path}: not a readable JSON file of the synthetic benchmark ({e})") from e


def split_labels(data_dir: epath.Path, split: str
                 ) -> tuple[list[list[str]], dict[str, np.ndarray], list[str]]:
  """(per record: its image file names in order, {file name: labels float32 [len(LABELS)]}, per record:
  its question) of a split."""
  records_file = data_dir / "Part_Segm" / f"{synthetic.DATASET_NAME}_{split}.json"
  coco_file = data_dir / synthetic.DATASET_NAME / "annotations" / f"{synthetic.DATASET_NAME}_{split}.json"
  records, coco = _read_json(records_file), _read_json(coco_file)
  names = {c["id"]: c["name"] for c in coco["categories"]}
  colour_of = {tuple(rgb): c for c, rgb in synthetic.COLORS.items()}
  images = {im["id"]: im for im in coco["images"]}
  objects = {im["file_name"]: [] for im in images.values()}   # (colour, class, centre x, centre y)
  for ann in coco["annotations"]:
    category = names.get(ann["category_id"])
    if category not in CLASSES:
      continue  # a part (handle, ribbon, cap)
    colour = colour_of.get(tuple(ann.get("color", ())))
    if colour is None or ann["image_id"] not in images:
      raise ProbeDataError(f"{coco_file}: annotation {ann['id']}: colour {ann.get('color')} is not one of "
                           f"{COLOURS} or image {ann['image_id']} is not listed")
    image = images[ann["image_id"]]
    x, y, w, h = ann["bbox"]
    objects[image["file_name"]].append((colour, category, (x + w / 2) / image["width"],
                                        (y + h / 2) / image["height"]))
  index = {label: i for i, label in enumerate(LABELS)}
  labels = {}
  for name, objs in objects.items():
    on = {f"colour:{c}" for c, *_ in objs} | {f"class:{k}" for _, k, *_ in objs}
    on |= {f"colour_class:{c} {k}" for c, k, *_ in objs}
    on |= {f"count:{k}>={n}" for k in CLASSES for n in (2, 3) if sum(o[1] == k for o in objs) >= n}
    on |= {f"side:{k} left" for _, k, cx, _ in objs if cx < 0.5}
    on |= {f"side:{k} top" for _, k, _, cy in objs if cy < 0.5}
    labels[name] = np.zeros(len(LABELS), np.float32)
    labels[name][[index[label] for label in on]] = 1.0
  files = {k: im["file_name"] for k, im in images.items()}
  image_lists = []
  for i, rec in enumerate(records):
    missing = [k for k in rec["img_ids"] if k not in files]
    if missing:
      raise ProbeDataError(f"{records_file}: record {i}: image ids {missing} are not in {coco_file}")
    image_lists.append([files[k] for k in rec["img_ids"]])
  return image_lists, labels, [str(rec.get("q", "")) for rec in records]


class Split(NamedTuple):
  """A split's records as the probe reads them (r records, n = the most images a record shows)."""
  eva_images: np.ndarray     # uint8 [r, n, V, V, 3], resized for EVA as at eval time, zero padded
  labels: np.ndarray         # float32 [r, n, len(LABELS)]
  image_valid: np.ndarray    # bool [r, n]
  question_ids: np.ndarray   # int32 [r, t]: the record's question as the Q-Former reads it
  question_mask: np.ndarray  # bool [r, t]


def load_split(data_dir: epath.Path, split: str, image_size: int, max_images: int,
               encode_question: Callable[[str], Sequence[int]] | None = None) -> Split:
  """A split's records, each image resized for EVA as at eval time (V = ``image_size``). With
  ``encode_question`` (question -> Q-Former ids, e.g. ``data.prompt.encode_question`` with the run's
  tokenizer) each record carries its question, padded to the longest; without, an empty text (t = 1,
  masked)."""
  image_lists, labels, questions = split_labels(data_dir, split)
  n = max(len(x) for x in image_lists)
  if n > max_images:
    raise ProbeDataError(f"{data_dir}: a {split} record shows {n} images; the model takes at most "
                         f"{max_images} (model.prima.max_images)")
  images = np.zeros((len(image_lists), n, image_size, image_size, 3), np.uint8)
  targets = np.zeros((len(image_lists), n, len(LABELS)), np.float32)
  valid = np.zeros((len(image_lists), n), bool)
  image_dir = data_dir / synthetic.DATASET_NAME / "images"
  resized = {}  # an image shown with several questions is decoded once
  for r, names in enumerate(image_lists):
    for k, name in enumerate(names):
      if name not in resized:
        with (image_dir / name).open("rb") as f:
          resized[name] = eva_resize(np.asarray(Image.open(f).convert("RGB")), image_size, train=False)
      images[r, k] = resized[name]
      targets[r, k], valid[r, k] = labels[name], True
  encoded = [list(encode_question(q)) for q in questions] if encode_question else [[0]] * len(questions)
  t = max(len(ids) for ids in encoded)
  question_ids = np.zeros((len(encoded), t), np.int32)
  question_mask = np.zeros((len(encoded), t), bool)
  for r, ids in enumerate(encoded):
    question_ids[r, :len(ids)] = ids
    question_mask[r, :len(ids)] = encode_question is not None
  return Split(images, targets, valid, question_ids, question_mask)


class Probe(nnx.Module):
  """The image side of a PRIMA model and a linear read-out.

  eva_images uint8 [b, n, V, V, 3], image_valid [b, n], question_ids int32 [b, t], question_mask bool
  [b, t] -> logits [b, n, len(LABELS)].
  """

  def __init__(self, model_cfg: Any, through: str, *, seed: int):
    self.prima = Prima(model_cfg, rngs=init_rngs(seed))
    self.through = through
    # EVA's features are averaged over patches; the image tokens are read side by side (the LLM reads
    # them one by one, so each may say something else).
    width = (model_cfg.vision.width if through == "eva_features"
             else model_cfg.llm.hidden_size * model_cfg.qformer.num_query_tokens)
    self.readout = nnx.Linear(width, len(LABELS), rngs=nnx.Rngs(seed + 1))

  def __call__(self, eva_images: jax.Array, image_valid: jax.Array, question_ids: jax.Array,
               question_mask: jax.Array) -> jax.Array:
    features = self.prima.batch_eva_features(dict(eva_images=eva_images))  # [b, n, T, E]
    if self.through == "eva_features":
      return self.readout(features.mean(2))
    # The instruction-aware Q-Former's queries share self-attention with the question's tokens: trained
    # without them, the image tokens it gives with a question say less (600 steps trained on an empty
    # text, scored with the questions: classes 0.80 -> 0.75, colours 1.00 -> 0.90, docs/demo.md).
    tokens = self.prima.image_tokens_from_features(features, image_valid, question_ids, question_mask)
    return self.readout(tokens.reshape(*tokens.shape[:2], -1))


def draw_rows(rng: np.random.Generator, image_counts: np.ndarray, batch_size: int) -> tuple[np.ndarray, int]:
  """One training step's records and their image count k: a record drawn uniformly at random gives k,
  then ``batch_size`` records are drawn uniformly (with replacement) from those showing k images.

  Each record is as likely in every row as under uniform draws from all records (k is drawn in
  proportion to how many records show k images), but a step computes k image slots instead of the
  split's most: the records of the demo show 2-5 images, 3.4 on average, so a batch padded to 5 slots
  spends about a third of EVA and the Q-Former on padding. One compiled step per image count.

  image_counts: int [records], real images per record (they come first).
  Returns: (rows int [batch_size], k).
  """
  k = int(image_counts[rng.integers(0, len(image_counts))])
  same = np.flatnonzero(image_counts == k)
  return same[rng.integers(0, len(same), batch_size)], k


def masked_bce(logits: jax.Array, targets: jax.Array, valid: jax.Array) -> jax.Array:
  per_image = optax.sigmoid_binary_cross_entropy(logits, targets).mean(-1)
  return (per_image * valid).sum() / jnp.maximum(valid.sum(), 1)


def score(logits: np.ndarray, targets: np.ndarray, valid: np.ndarray, majority: np.ndarray) -> dict:
  """Per label group: the share of (image, label) decisions right (``{group}_acc``), the majority
  baseline's share (``{group}_majority``) and the share of images with the whole group right
  (``{group}_exact``; a sparse group's accuracy is high even for a read-out that says no to everything);
  ``all_right``: images with every label right."""
  right = ((logits > 0) == (targets > 0.5))[valid]            # [images, labels]
  base = (majority[None] == (targets > 0.5))[valid]
  out = {}
  for g, s in GROUPS.items():
    out.update({f"{g}_acc": float(right[:, s].mean()), f"{g}_majority": float(base[:, s].mean()),
                f"{g}_exact": float(right[:, s].all(-1).mean())})
  out["all_right"] = float(right.all(-1).mean())
  return out


def run_probe(model_cfg: Any, data_dir: epath.Path, *, steps: int, batch_size: int, learning_rate: float,
              through: str = THROUGH[0], evals: int = 3, seed: int = 0,
              encode_question: Callable[[str], Sequence[int]] | None = None, train_questions: bool = True,
              eval_questions: bool = True, report=print) -> tuple[dict, dict[str, Any]]:
  """Trains the probe; returns ``{"steps", "seconds", "through", "questions", "images": {split: images in
  its records}, "evals": [{"step", "loss", "{group}_acc", "{group}_majority", "{group}_exact", ...,
  "all_right"}, ...]}`` and the trained image side's parameters ``{"/"-joined path: array}`` (paths as in
  ``Prima``, under :data:`IMAGE_SIDE`). An image shown with several questions counts (and is trained on)
  each time. ``encode_question``: the Q-Former reads each record's question, as in the model (see
  :func:`load_split`); None: an empty text. With an encoder, ``train_questions`` / ``eval_questions``
  False hide the questions from the training steps / the val scores (masked: the queries read none of
  it): how much a question changes what the image tokens say.
  """
  size, max_images = int(model_cfg.vision.image_size), int(model_cfg.prima.max_images)
  train = load_split(data_dir, "train", size, max_images, encode_question)
  val = load_split(data_dir, "val", size, max_images, encode_question)
  train.question_mask[:] &= train_questions
  val.question_mask[:] &= eval_questions
  majority = train.labels[train.image_valid].mean(0) > 0.5
  probe = Probe(model_cfg, through, seed=seed)
  optimizer = nnx.Optimizer(probe, optax.adam(learning_rate), wrt=nnx.Param)
  # jax.jit of a pure step over the split state, not nnx.jit over the modules: nnx.jit walks the probe's
  # and the optimizer's graphs (~1000 arrays: the whole model and Adam's moments) on every call, ~0.08 s
  # of a 0.27 s step on a 2-core CPU (docs/demo.md). The state is donated; the modules get it back at
  # the end.
  graphdef, state = nnx.split((probe, optimizer))

  @functools.partial(jax.jit, donate_argnums=0)
  def train_step(state, images, targets, valid, question_ids, question_mask):
    probe, optimizer = nnx.merge(graphdef, state)
    loss, grads = nnx.value_and_grad(
        lambda p: masked_bce(p(images, valid, question_ids, question_mask), targets, valid))(probe)
    optimizer.update(probe, grads)
    return nnx.state((probe, optimizer)), loss

  @jax.jit
  def predict(state, *inputs):
    return nnx.merge(graphdef, state)[0](*inputs)

  def evaluate() -> dict:
    # Fixed-size batches (the last one padded with invalid rows): one compiled shape.
    logits, n = [], len(val.labels)
    for start in range(0, n, batch_size):
      rows = np.arange(start, start + batch_size) % n
      valid = val.image_valid[rows] & (np.arange(start, start + batch_size) < n)[:, None]
      logits.append(np.asarray(predict(state, val.eva_images[rows], valid, val.question_ids[rows],
                                       val.question_mask[rows])))
    return score(np.concatenate(logits)[:n], val.labels, val.image_valid, majority)

  rng = np.random.default_rng(seed)
  image_counts = train.image_valid.sum(1)
  every = max(steps // max(evals, 1), 1)
  results, losses, start = [], [], time.perf_counter()
  for step in range(1, steps + 1):
    rows, k = draw_rows(rng, image_counts, batch_size)
    state, loss = train_step(state, train.eva_images[rows, :k], train.labels[rows, :k],
                             train.image_valid[rows, :k], train.question_ids[rows], train.question_mask[rows])
    # One step in flight: the next batch is drawn while this one runs, and no more than one waits.
    losses.append(loss)
    if len(losses) > 1:
      losses[-2] = float(losses[-2])
    if step % every == 0 or step == steps:
      losses[-1] = float(losses[-1])
      result = dict(step=step, loss=float(np.mean(losses[-every:])), **evaluate())
      results.append(result)
      groups = " | ".join(f"{g} {result[f'{g}_acc']:.3f} ({result[f'{g}_majority']:.3f}) exact "
                          f"{result[f'{g}_exact']:.3f}" for g in GROUPS)
      report(f"step {step}/{steps} | loss {result['loss']:.4f} | val: {groups} | all right "
             f"{result['all_right']:.3f} | {time.perf_counter() - start:.0f} s")
  nnx.update((probe, optimizer), state)
  summary = dict(steps=steps, seconds=time.perf_counter() - start, through=through,
                 questions={"train": bool(train.question_mask.any()), "val": bool(val.question_mask.any())},
                 images={"train": int(train.image_valid.sum()), "val": int(val.image_valid.sum())},
                 evals=results)
  flat = flatten(nnx.state(probe.prima, nnx.Param).to_pure_dict())
  return summary, {k: v for k, v in flat.items() if k.split("/", 1)[0] in IMAGE_SIDE}


def _key_path(path) -> str:
  """A jax key path of a pure-dict tree -> its "/"-joined form (the paths ``train.trainable`` matches)."""
  return path_str(k.key for k in path)


def flatten(tree: dict) -> dict[str, Any]:
  """A pure-dict parameter tree -> {"/"-joined path: leaf}."""
  return {_key_path(p): v for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def pretrain(pcfg: Any, model_cfg: Any, data_dir: epath.Path, params: dict, frozen: dict, *, seed: int,
             encode_question: Callable[[str], Sequence[int]] | None = None, report=print
             ) -> tuple[dict, dict, dict]:
  """``train.image_pretraining`` (``pcfg``: steps, batch_size, learning_rate) on a fresh run's initial
  ``params`` / ``frozen`` (pure-dict trees of sharded arrays): returns them with every image-side leaf
  replaced by its pretrained value (same sharding), and the probe's summary. ``encode_question``: as in
  :func:`run_probe`."""
  summary, trained = run_probe(model_cfg, data_dir, steps=int(pcfg.steps), batch_size=int(pcfg.batch_size),
                               learning_rate=float(pcfg.learning_rate), evals=3, seed=seed,
                               encode_question=encode_question, report=report)
  placed = set()

  def place(path, value):
    key = _key_path(path)
    if key not in trained:
      return value
    if trained[key].shape != value.shape:
      raise ValueError(f"image pretraining: {key} has shape {trained[key].shape}, the model {value.shape}")
    placed.add(key)
    # From the host copy, shard by shard: also for a global sharding over several processes.
    host = np.asarray(trained[key]).astype(value.dtype)
    return jax.make_array_from_callback(value.shape, value.sharding, lambda index: host[index])

  params, frozen = (jax.tree_util.tree_map_with_path(place, tree) for tree in (params, frozen))
  missing = sorted(set(trained) - placed)
  if missing:
    raise ValueError(f"image pretraining: {len(missing)} parameters not in the model, e.g. {missing[0]}")
  return params, frozen, summary
