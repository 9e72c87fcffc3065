"""Batched PRIMA prediction with a small set of compiled shapes.

:class:`Predictor` turns (images, question) pairs into :class:`~prima_jax.inference.grounding.Prediction`
s in three jitted stages and one host stage:

1. ``generate`` [B, N images, L prompt tokens]: EVA -> SQuARE -> Q-Former -> LLM prefill + decode loop
   (:func:`prima_jax.inference.generate.generate`); returns tokens and the decode hidden states.
2. host: parse the tokens, route each ``[SEG]`` to its image (grounding.py).
3. ``sam_encode`` [B, P images]: the SAM image encoder once per image that has at least one mask
   (compacted per example, padded to P): [B, P, g, g, C], whatever N is.
4. ``decode_masks`` [B, M masks]: [SEG] hidden state -> seg_head -> SAM mask decoder against the
   routed image's embedding (its slot among the P); low-res logits go back to the host, which resizes
   them to each image's original size (grounding.low_res_to_original).

Shape buckets (every dimension of every compiled call comes from these, whatever the images):
B = ``batch_size`` (a short last batch is padded), N = the image bucket of the example with the most
images: ``min_image_bucket`` (8) or, above it, the next power of two, capped at ``prima.max_images`` (fewer
images are padded and masked; a 64-image model asked about 3 images runs EVA and the Q-Former on 8, not
64), L = the smallest of ``prompt_buckets`` that holds the longest prompt of the batch,
T = ``max_new_tokens``, P = next power of two >= the most distinct mask images of an example (capped
at N), M = next power of two >= the most masks of an example. Image height/width never reach a
compiled shape (images are resized to the model's input sizes on the host).

Multi-host: each process passes its own examples (the same number of calls on every process);
bucket choices are agreed across processes (the maximum) so the global arrays have one shape.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import zlib
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from prima_jax.data import preprocess
from prima_jax.data.prompt import PromptError, PromptTooLong, encode_example, system_prompt
from prima_jax.inference.generate import SamplingConfig, generate
from prima_jax.inference.grounding import (
  ParsedAnswer,
  Prediction,
  SegPrediction,
  low_res_to_original,
  mask_score,
  parse_generation,
)
from prima_jax.models.prima import gather_positions
from prima_jax.sharding import activation_sharding, process_max, state_shardings

DEFAULT_PROMPT_BUCKETS = (64, 128, 256, 512, 1024, 2048, 4096)
BATCH_AXES = ("data", "fsdp")
GREEDY = SamplingConfig()


class InputError(ValueError):
  """An input the predictor cannot use (bad image, too many images, empty question, prompt too long)."""


@dataclasses.dataclass
class PromptInputs:
  """One example, preprocessed on the host.

  Attributes:
    eva_images: float32 [n, V, V, 3]; sam_images: float32 [n, S, S, 3]; sam_sizes: int32 [n, 2]
      (resized (h, w) inside the SAM frame); image_sizes: original (H, W) per image.
    input_ids: int32 [l] prompt up to ``ASSISTANT:`` with image slots; qformer_input_ids: int32 [q].
    forced_ids: teacher-forced answer ids (generation continues after them unless they end in
      ``</s>``), or None.
    example_id: the caller's id; seed: per-example sampling seed.
  """
  eva_images: np.ndarray
  sam_images: np.ndarray
  sam_sizes: np.ndarray
  image_sizes: list[tuple[int, int]]
  input_ids: np.ndarray
  qformer_input_ids: np.ndarray
  forced_ids: list[int] | None = None
  example_id: str = ""
  seed: int = 0

  @property
  def num_images(self) -> int:
    return len(self.image_sizes)


def pick_bucket(value: int, buckets: Sequence[int], what: str) -> int:
  """The smallest bucket >= value; InputError when none is."""
  for b in sorted(buckets):
    if b >= value:
      return int(b)
  raise InputError(f"{what} {value} exceeds the largest bucket {max(buckets)}")


def pow2_bucket(value: int, cap: int | None = None) -> int:
  """The next power of two >= max(value, 1), capped at ``cap``."""
  b = 1 << max(int(value) - 1, 0).bit_length()
  return min(b, cap) if cap is not None else b


def image_bucket(value: int, max_images: int, minimum: int = 8) -> int:
  """The image slots N of a batch whose largest example has ``value`` images: ``minimum`` or, above it,
  the next power of two, capped at ``max_images``."""
  return min(max(pow2_bucket(value), minimum), int(max_images))


# Bucket choices agreed across processes.
_agree_max = process_max


class Predictor:
  """Grounded answers from a :class:`~prima_jax.models.prima.Prima` (see the module docstring).

  Args:
    model: the model (put in eval mode; its parameters are copied onto ``mesh``).
    tokenizers: (LLM tokenizer, Q-Former tokenizer) from ``prima_jax.data.tokenizer``.
    max_new_tokens: T, the generation budget.
    max_question_length: Q-Former text length (the training config's ``data.max_question_length``).
    batch_size: B, examples per compiled call on this process.
    mesh: shard the batch over the mesh's data axes (None: the default device).
    prompt_buckets: allowed prompt lengths L.
    padding_side: "left" or "right" padding of prompts (both decode identically).
    min_image_bucket: the smallest image bucket N (see the module docstring).
  """

  def __init__(self, model, tokenizers, *, max_new_tokens: int = 256, max_question_length: int | None = None,
               batch_size: int = 1, mesh: Mesh | None = None,
               prompt_buckets: Sequence[int] = DEFAULT_PROMPT_BUCKETS, padding_side: str = "left",
               min_image_bucket: int = 8):
    if padding_side not in ("left", "right"):
      raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if max_new_tokens < 1 or batch_size < 1:
      raise ValueError(f"max_new_tokens ({max_new_tokens}) and batch_size ({batch_size}) must be >= 1")
    self.cfg = cfg = model.cfg
    self.llm_tok, self.qformer_tok = tokenizers
    self.max_new_tokens = int(max_new_tokens)
    self.max_question_length = int(max_question_length or cfg.qformer.max_text_length)
    self.batch_size = int(batch_size)
    self.mesh = mesh
    limit = cfg.llm.max_position_embeddings - self.max_new_tokens
    self.prompt_buckets = tuple(sorted(b for b in prompt_buckets if b <= limit)) or (int(limit),)
    self.padding_side = padding_side
    self.min_image_bucket = int(min_image_bucket)
    if mesh is not None:
      shards = int(np.prod([mesh.shape[a] for a in BATCH_AXES if a in mesh.axis_names]))
      if (self.batch_size * jax.process_count()) % shards:
        raise ValueError(f"the global batch ({self.batch_size} x {jax.process_count()} processes) is not "
                         f"divisible by the {shards} data shards of the mesh")
    self.trace_counts: collections.Counter[str] = collections.Counter()
    model.eval()
    self._graphdef, state = nnx.split(model)
    if mesh is not None:
      state = jax.device_put(state, state_shardings(state, mesh))
    self._state = state
    self._generate = jax.jit(self._generate_fn, static_argnames=("greedy",))
    self._sam_encode = jax.jit(self._sam_encode_fn)
    self._decode_masks = jax.jit(self._decode_masks_fn)

  # --- compiled stages ---------------------------------------------------------------------------

  def _context(self):
    return activation_sharding(self.mesh) if self.mesh is not None else contextlib.nullcontext()

  def _generate_fn(self, state, batch, forced_ids, forced_length, row_seeds, temperature, top_p, seed, *,
                   greedy):
    self.trace_counts["generate"] += 1
    with self._context():
      model = nnx.merge(self._graphdef, state)
      return generate(model, batch, max_new_tokens=self.max_new_tokens, eos_id=self.llm_tok.eos_id,
                      greedy=greedy, temperature=temperature, top_p=top_p, seed=seed, row_seeds=row_seeds,
                      forced_ids=forced_ids, forced_length=forced_length)

  def _sam_encode_fn(self, state, sam_images):
    """sam_images [B, P, S, S, 3] (the images that receive a mask, compacted) -> [B, P, g, g, C]."""
    self.trace_counts["sam_encode"] += 1
    with self._context():
      model = nnx.merge(self._graphdef, state)
      return model.sam_embeddings(sam_images)

  def _decode_masks_fn(self, state, hidden, seg_tokens, seg_slot, sam_embeddings):
    """hidden [B, T + 1, D], seg_tokens [B, M] ([SEG] position in ``hidden``: token index + 1),
    seg_slot [B, M] (the routed image's slot among the P encoded ones), sam_embeddings [B, P, g, g, C]
    -> low-res logits [B, M, 4g, 4g] float32."""
    self.trace_counts["decode_masks"] += 1
    with self._context():
      model = nnx.merge(self._graphdef, state)
      seg_hidden = gather_positions(hidden, model.seg_hidden_positions(seg_tokens))
      low_res = model.decode_masks(sam_embeddings, model.seg_head(seg_hidden), seg_slot)
      return low_res.astype(jnp.float32)

  # --- host side ---------------------------------------------------------------------------------

  def prepare(self, images: Sequence[np.ndarray], question: str, *, example_id: str = "",
              forced_answer: str | None = None, forced_eos: bool = True, seed: int | None = None
              ) -> PromptInputs:
    """Preprocesses one example.

    Args:
      images: 1..max_images uint8 [H, W, 3] arrays (IMAGE1, IMAGE2, ...).
      question: the question (no image intro).
      forced_answer: an answer (``<p> .. </p> [SEG] (IMAGEk)`` format) to teacher-force instead of
        generating; with ``forced_eos=False`` it is a prefix and generation continues after it.
      seed: sampling seed of this example (default: from ``example_id``).
    Raises:
      InputError naming the problem (image index, counts, lengths).
    """
    cfg = self.cfg
    if not question or not question.strip():
      raise InputError("the question is empty")
    n = len(images)
    if not 1 <= n <= cfg.prima.max_images:
      raise InputError(f"{n} images given; the model takes 1 to prima.max_images={cfg.prima.max_images}")
    size, s = cfg.vision.image_size, cfg.sam.image_size
    eva = np.empty((n, size, size, 3), np.float32)
    sam = np.empty((n, s, s, 3), np.float32)
    sam_sizes = np.empty((n, 2), np.int32)
    for k, image in enumerate(images):
      try:
        preprocess.eva_preprocess(image, size, train=False, out=eva[k])
        sam_sizes[k] = preprocess.sam_preprocess(image, s, out=sam[k])[1]
      except ValueError as e:
        raise InputError(f"image {k + 1}: {e}") from e
    common = dict(num_query_tokens=cfg.qformer.num_query_tokens, image_token_id=cfg.prima.image_token_id,
                  max_question_length=self.max_question_length, system=system_prompt(cfg))
    try:
      prompt = encode_example(self.llm_tok, self.qformer_tok, question.strip(), None, n,
                              max_length=max(self.prompt_buckets), **common)
      forced = None
      if forced_answer is not None:
        full = encode_example(self.llm_tok, self.qformer_tok, question.strip(), forced_answer, n,
                              max_length=max(self.prompt_buckets) + self.max_new_tokens + 1, **common)
        forced = full["input_ids"][len(prompt["input_ids"]):].tolist()
        if not forced_eos:
          forced = forced[:-1]
        if len(forced) > self.max_new_tokens:
          raise InputError(f"the forced answer has {len(forced)} tokens > "
                           f"max_new_tokens={self.max_new_tokens}")
    except PromptTooLong as e:
      raise InputError(f"{e} (prompt buckets {self.prompt_buckets})") from e
    except PromptError as e:
      raise InputError(str(e)) from e
    return PromptInputs(
        eva_images=eva, sam_images=sam, sam_sizes=sam_sizes,
        image_sizes=[(int(im.shape[0]), int(im.shape[1])) for im in images],
        input_ids=prompt["input_ids"], qformer_input_ids=prompt["qformer_input_ids"], forced_ids=forced,
        example_id=example_id,
        seed=int(seed if seed is not None else zlib.crc32(example_id.encode()) & 0x7FFFFFFF))

  def _put(self, x: np.ndarray):
    if self.mesh is None:
      return jnp.asarray(x)
    axes = tuple(a for a in BATCH_AXES if a in self.mesh.axis_names)
    spec = PartitionSpec(axes, *([None] * (np.ndim(x) - 1)))
    return jax.make_array_from_process_local_data(NamedSharding(self.mesh, spec), np.asarray(x))

  def _local(self, x) -> np.ndarray:
    if self.mesh is None or jax.process_count() == 1:
      return np.asarray(x)
    axes = tuple(a for a in BATCH_AXES if a in self.mesh.axis_names)
    spec = PartitionSpec(axes, *([None] * (x.ndim - 1)))
    return np.asarray(multihost_utils.global_array_to_host_local_array(x, self.mesh, spec))

  def _prompt_batch(self, rows: list[PromptInputs]) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    cfg, b, t_max = self.cfg, len(rows), self.max_new_tokens
    n = image_bucket(_agree_max(max(r.num_images for r in rows)), cfg.prima.max_images, self.min_image_bucket)
    size = cfg.vision.image_size
    longest = _agree_max(max(len(r.input_ids) for r in rows))
    length = pick_bucket(longest, self.prompt_buckets, "prompt length")
    q = self.max_question_length
    batch = dict(
        eva_images=np.zeros((b, n, size, size, 3), np.float32),
        image_valid=np.zeros((b, n), bool),
        qformer_input_ids=np.full((b, q), cfg.qformer.pad_token_id, np.int32),
        qformer_attention_mask=np.zeros((b, q), bool),
        input_ids=np.full((b, length), cfg.llm.pad_token_id, np.int32),
        attention_mask=np.zeros((b, length), bool),
    )
    forced = np.full((b, t_max), cfg.llm.pad_token_id, np.int32)
    forced_length = np.zeros((b,), np.int32)
    for i, r in enumerate(rows):
      k, l_i, q_i = r.num_images, len(r.input_ids), len(r.qformer_input_ids)
      batch["eva_images"][i, :k] = r.eva_images
      batch["image_valid"][i, :k] = True
      batch["qformer_input_ids"][i, :q_i] = r.qformer_input_ids
      batch["qformer_attention_mask"][i, :q_i] = True
      where = slice(length - l_i, length) if self.padding_side == "left" else slice(0, l_i)
      batch["input_ids"][i, where] = r.input_ids
      batch["attention_mask"][i, where] = True
      if r.forced_ids:
        forced[i, :len(r.forced_ids)] = r.forced_ids
        forced_length[i] = len(r.forced_ids)
    return batch, forced, forced_length

  def predict(self, examples: Sequence[PromptInputs], sampling: SamplingConfig = GREEDY) -> list[Prediction]:
    """Predictions for ``examples``, ``batch_size`` at a time (in order)."""
    out = []
    for start in range(0, len(examples), self.batch_size):
      out += self.predict_batch(examples[start:start + self.batch_size], sampling)
    return out

  def predict_batch(self, examples: Sequence[PromptInputs], sampling: SamplingConfig = GREEDY
                    ) -> list[Prediction]:
    """Predictions for at most ``batch_size`` examples (one call of each compiled stage)."""
    if not 1 <= len(examples) <= self.batch_size:
      raise ValueError(f"predict_batch takes 1..{self.batch_size} examples, got {len(examples)}")
    cfg = self.cfg
    rows = list(examples) + [examples[0]] * (self.batch_size - len(examples))  # padding rows, discarded
    batch, forced, forced_length = self._prompt_batch(rows)
    seeds = np.asarray([r.seed for r in rows], np.int32)
    out = self._generate(self._state, {k: self._put(v) for k, v in batch.items()}, self._put(forced),
                         self._put(forced_length), self._put(seeds), np.float32(sampling.temperature or 1.0),
                         np.float32(sampling.top_p), np.int32(sampling.seed), greedy=sampling.greedy)
    tokens, lengths = self._local(out["tokens"]), self._local(out["lengths"])
    ids = dict(seg_id=cfg.prima.seg_token_id, p_start_id=self.llm_tok.token_to_id("<p>"),
               p_end_id=self.llm_tok.token_to_id("</p>"))
    parsed: list[ParsedAnswer] = [parse_generation(tokens[i], self.llm_tok, num_images=r.num_images, **ids)
                                  for i, r in enumerate(rows)]
    masks = self._masks(rows, parsed, out["hidden"])
    preds = []
    for i, (r, a) in enumerate(zip(examples, parsed)):
      finished = bool(self.llm_tok.eos_id in tokens[i, :lengths[i]])
      preds.append(Prediction(answer=a.answer, segs=masks[i], dropped=a.dropped, token_ids=a.token_ids,
                              finished=finished, num_images=r.num_images, image_sizes=list(r.image_sizes),
                              example_id=r.example_id))
    return preds

  def _masks(self, rows: list[PromptInputs], parsed: list[ParsedAnswer], hidden) -> list[list[SegPrediction]]:
    """Decodes every routed [SEG] of the batch; per row, SegPredictions in answer order."""
    cfg = self.cfg
    s, b = cfg.sam.image_size, len(rows)
    used = [sorted({seg.image_index for seg in a.routed}) for a in parsed]
    most_masks = _agree_max(max(len(a.routed) for a in parsed))
    if most_masks == 0:
      return [[] for _ in rows]
    m = pow2_bucket(most_masks)
    p = pow2_bucket(_agree_max(max(len(u) for u in used)), cap=cfg.prima.max_images)
    sam_images = np.zeros((b, p, s, s, 3), np.float32)
    seg_tokens = np.ones((b, m), np.int32)
    seg_slot = np.zeros((b, m), np.int32)
    for i, (r, a, u) in enumerate(zip(rows, parsed, used)):
      for j, k in enumerate(u):
        sam_images[i, j] = r.sam_images[k]
      slot_of = {k: j for j, k in enumerate(u)}
      for j, seg in enumerate(a.routed):
        seg_tokens[i, j] = seg.token_index + 1
        seg_slot[i, j] = slot_of[seg.image_index]
    embeddings = self._sam_encode(self._state, self._put(sam_images))
    low_res = self._local(self._decode_masks(self._state, hidden, self._put(seg_tokens), self._put(seg_slot),
                                             embeddings))
    out = []
    for i, (r, a) in enumerate(zip(rows, parsed)):
      segs = []
      for j, seg in enumerate(a.routed):
        k = seg.image_index
        logits = low_res_to_original(low_res[i, j], s, tuple(r.sam_sizes[k]), r.image_sizes[k])
        mask = logits > 0
        segs.append(SegPrediction(phrase=seg.phrase, image_index=k, mask=mask, score=mask_score(logits, mask),
                                  token_index=seg.token_index))
      out.append(segs)
    return out
