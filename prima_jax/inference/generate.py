"""Autoregressive decoding of PRIMA's LLM over a static KV cache (pure functions, called inside ``jit``).

Prefill runs the whole padded prompt once; the decode loop (``lax.while_loop`` over a fixed budget of
``max_new_tokens``, leaving early once every row has produced ``</s>``) feeds one token per step.
Prompts may be padded on the left, the right or both: RoPE positions count real tokens and the cache's
validity mask hides pads, so every row decodes exactly as it would alone.

The loop keeps the LLM's final hidden states ``H`` [b, T + 1, D] for the grounding step:
``H[:, 0]`` is the hidden state of the last prompt token and ``H[:, t + 1]`` that of generated token
``t`` (the output of feeding it). The hidden state that *produced* token ``t`` (its logits) is
``H[:, t]``, so a ``[SEG]`` generated at step ``t`` sits at position ``t + 1`` of ``H`` and
``Prima.seg_hidden_positions`` maps it to ``t`` ("previous", GLaMM/LISA) or ``t + 1`` ("self").
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """How the next token is chosen.

  Attributes:
    temperature: 0 = greedy (argmax); > 0 divides the logits before sampling.
    top_p: nucleus sampling: sample among the most likely tokens whose probabilities sum to top_p
      (1 = the whole vocabulary). Ignored when greedy.
    seed: base seed; row ``i`` of a batch samples with ``fold_in(key(seed), example seed)``, so an
      example's tokens do not depend on the batch it is in.
  """
  temperature: float = 0.0
  top_p: float = 1.0
  seed: int = 0

  def __post_init__(self):
    if self.temperature < 0:
      raise ValueError(f"temperature must be >= 0, got {self.temperature}")
    if not 0 < self.top_p <= 1:
      raise ValueError(f"top_p must lie in (0, 1], got {self.top_p}")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0


def top_p_filter(logits: Array, top_p: Array | float) -> Array:
  """Sets logits outside the nucleus to -inf. logits [b, V] float32 -> [b, V].

  The nucleus of a row: the highest-probability tokens, in order, until their cumulative probability
  reaches ``top_p`` (the token that crosses it is kept; the top token always is).
  """
  ordered = jnp.sort(logits, axis=-1)[:, ::-1]
  probs = jax.nn.softmax(ordered, axis=-1)
  before = jnp.cumsum(probs, axis=-1) - probs  # probability mass strictly above each token
  cutoff = jnp.min(jnp.where(before < top_p, ordered, jnp.inf), axis=-1, keepdims=True)
  return jnp.where(logits < cutoff, -jnp.inf, logits)


def select_tokens(logits: Array, step: Array, row_seeds: Array, *, greedy: bool, temperature: Array,
                  top_p: Array, base_seed: Array) -> Array:
  """Next token per row. logits [b, V] float32, row_seeds [b] int32 -> [b] int32.

  Sampling keys are ``fold_in(fold_in(key(base_seed), row_seed), step)``: independent of the batch.
  """
  if greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  base = jax.random.key(base_seed)

  def one(row_logits, seed):
    key = jax.random.fold_in(jax.random.fold_in(base, seed), step)
    return jax.random.categorical(key, row_logits)

  filtered = top_p_filter(logits / temperature, top_p)
  return jax.vmap(one)(filtered, row_seeds).astype(jnp.int32)


def last_real_index(mask: Array) -> Array:
  """mask [b, l] bool -> [b] int32 index of the last True (0 for a row without one)."""
  idx = jnp.arange(mask.shape[1], dtype=jnp.int32)
  return jnp.maximum(jnp.max(jnp.where(mask, idx, -1), axis=1), 0)


def decode_loop(llm, prompt_embeds: Array, prompt_mask: Array, *, max_new_tokens: int, eos_id: int,
                pad_id: int, greedy: bool = True, temperature: Array | float = 1.0,
                top_p: Array | float = 1.0, seed: Array | int = 0, row_seeds: Array | None = None,
                forced_ids: Array | None = None, forced_length: Array | None = None,
                cache_dtype: Any = None) -> dict[str, Array]:
  """Prefill + decode with a KV cache of ``l + max_new_tokens`` slots.

  Args:
    llm: a :class:`prima_jax.models.llama.Llama`.
    prompt_embeds: [b, l, D] embedded prompts (image slots filled), padded anywhere.
    prompt_mask: [b, l] bool, True = real prompt token.
    max_new_tokens: T, the decode budget (static).
    eos_id, pad_id: ``</s>`` ends a row; later slots of ``tokens`` hold ``pad_id``.
    greedy: argmax (static); else sample with ``temperature``, ``top_p`` and keys from ``seed`` and
      ``row_seeds`` (see :class:`SamplingConfig`; these may be traced).
    row_seeds: [b] int32 per-row sampling seeds (default 0..b-1).
    forced_ids: [b, T] int32 teacher-forced tokens: row i takes ``forced_ids[i, t]`` for ``t <
      forced_length[i]`` instead of choosing (e.g. a given answer or answer prefix).
    forced_length: [b] int32 (default 0 = free generation).
    cache_dtype: KV cache dtype (default: the prompt embeddings' dtype).

  Returns:
    ``tokens`` [b, T] int32 (``pad_id`` after ``</s>``), ``lengths`` [b] int32 (tokens up to and
    including ``</s>``, or T), ``hidden`` [b, T + 1, D] (see the module docstring), ``steps`` int32
    (decode steps run; < T when every row finished early).
  """
  b, length, _ = prompt_embeds.shape
  t_max = int(max_new_tokens)
  if t_max < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  prompt_mask = prompt_mask.astype(bool)
  row_seeds = jnp.arange(b, dtype=jnp.int32) if row_seeds is None else jnp.asarray(row_seeds, jnp.int32)
  temperature = jnp.asarray(temperature, jnp.float32)
  top_p = jnp.asarray(top_p, jnp.float32)
  base_seed = jnp.asarray(seed, jnp.int32)
  if forced_ids is None:
    forced_ids = jnp.full((b, t_max), pad_id, jnp.int32)
    forced_length = jnp.zeros((b,), jnp.int32)
  elif forced_length is None:
    raise ValueError("forced_ids needs forced_length")

  cache = llm.init_cache(b, length + t_max, cache_dtype or prompt_embeds.dtype)
  logits, hidden, cache = llm(prompt_embeds, attention_mask=prompt_mask, cache=cache)
  last = last_real_index(prompt_mask)
  rows = jnp.arange(b)
  next_logits = logits[rows, last]                       # [b, V] float32
  hidden_buf = jnp.zeros((b, t_max + 1, hidden.shape[-1]), hidden.dtype)
  hidden_buf = hidden_buf.at[:, 0].set(hidden[rows, last])
  tokens = jnp.full((b, t_max), pad_id, jnp.int32)
  done = jnp.zeros((b,), bool)
  lengths = jnp.full((b,), t_max, jnp.int32)
  ones = jnp.ones((b, 1), bool)

  def cond(state):
    t, _, _, done, _, _, _ = state
    return (t < t_max) & ~jnp.all(done)

  def body(state):
    t, tokens, hidden_buf, done, lengths, next_logits, cache = state
    chosen = select_tokens(next_logits, t, row_seeds, greedy=greedy, temperature=temperature,
                           top_p=top_p, base_seed=base_seed)
    forced = jax.lax.dynamic_index_in_dim(forced_ids, t, axis=1, keepdims=False)
    chosen = jnp.where(t < forced_length, forced, chosen)
    token = jnp.where(done, pad_id, chosen)
    tokens = jax.lax.dynamic_update_index_in_dim(tokens, token, t, axis=1)
    finished = ~done & (token == eos_id)
    lengths = jnp.where(finished, t + 1, lengths)
    done = done | finished
    step_logits, step_hidden, cache = llm(llm.embed(token[:, None]), attention_mask=ones, cache=cache)
    hidden_buf = jax.lax.dynamic_update_index_in_dim(hidden_buf, step_hidden[:, 0].astype(hidden_buf.dtype),
                                                     t + 1, axis=1)
    return t + 1, tokens, hidden_buf, done, lengths, step_logits[:, 0], cache

  state = (jnp.zeros((), jnp.int32), tokens, hidden_buf, done, lengths, next_logits, cache)
  steps, tokens, hidden_buf, _, lengths, _, _ = jax.lax.while_loop(cond, body, state)
  return dict(tokens=tokens, lengths=lengths, hidden=hidden_buf, steps=steps)


def generate(model, batch: dict[str, Array], *, max_new_tokens: int, eos_id: int, **decode_kwargs
             ) -> dict[str, Array]:
  """PRIMA generation: image tokens -> embedded prompt -> :func:`decode_loop`.

  Args:
    model: a :class:`prima_jax.models.prima.Prima` (eval mode).
    batch: ``eva_images`` [b, n, V, V, 3], ``image_valid`` [b, n], ``qformer_input_ids`` /
      ``qformer_attention_mask`` [b, q], ``input_ids`` / ``attention_mask`` [b, l]: prompts up to
      ``ASSISTANT:`` with image slots (``prima.image_token_id``), padded on either side.
    decode_kwargs: sampling and forcing arguments of :func:`decode_loop`.
  Returns:
    what :func:`decode_loop` returns.
  """
  image_tokens = model.image_tokens(batch["eva_images"], batch["image_valid"], batch["qformer_input_ids"],
                                    batch["qformer_attention_mask"])
  embeds = model.embed_prompt(batch["input_ids"], image_tokens)
  return decode_loop(model.llm, embeds, batch["attention_mask"], max_new_tokens=max_new_tokens, eos_id=eos_id,
                     pad_id=model.cfg.llm.pad_token_id, **decode_kwargs)
