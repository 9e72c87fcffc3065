"""KV-cache decoding against full recomputation, sampling, [SEG] parsing/routing and mask resizing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from prima_jax.data import synthetic
from prima_jax.data.tokenizer import build_synthetic_tokenizers
from prima_jax.inference.generate import decode_loop, top_p_filter
from prima_jax.inference.grounding import low_res_to_original, parse_generation
from prima_jax.models.configs import added_token_ids, tiny_config
from prima_jax.models.llama import Llama
from prima_jax.models.sam.sam import postprocess_masks, upscale_masks

from parity_utils import assert_close

T = 6


@pytest.fixture(scope="module")
def llm():
  cfg = tiny_config()
  model = Llama(cfg.llm, cfg.lora, rngs=nnx.Rngs(3))
  model.eval()  # no LoRA dropout
  return model


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  return build_synthetic_tokenizers(synthetic.vocabulary(), tmp_path_factory.mktemp("tok"),
                                    first_added_id=tiny_config().prima.first_added_id)[0]


_IDS = added_token_ids(tiny_config().prima)
SEG_ID, P_START_ID, P_END_ID = _IDS["[SEG]"], _IDS["<p>"], _IDS["</p>"]


def _padded(embeds_per_row, side):
  """Rows of different lengths -> [b, l, d] embeddings and mask; ``side``: 'left', 'right' or 'both'."""
  length = max(len(e) for e in embeds_per_row) + 2
  d = embeds_per_row[0].shape[-1]
  x = np.zeros((len(embeds_per_row), length, d), np.float32)
  mask = np.zeros((len(embeds_per_row), length), bool)
  for i, e in enumerate(embeds_per_row):
    start = {"left": length - len(e), "right": 0, "both": 1}[side]
    x[i, start:start + len(e)] = e
    mask[i, start:start + len(e)] = True
  return jnp.asarray(x), jnp.asarray(mask)


def _reference_greedy(llm, prompt: np.ndarray, steps: int):
  """Greedy decoding of one unpadded prompt by recomputing the whole sequence every step, no cache.
  Returns tokens [steps] and the hidden state that produced each token [steps, d]."""
  n, width = prompt.shape
  size = 16 + steps  # one fixed buffer: the sequence occupies its first n + t slots

  @jax.jit
  def full(seq, length):
    mask = jnp.arange(size)[None] < length
    logits, hidden, _ = llm(seq, attention_mask=mask)
    return jnp.argmax(logits[0, length - 1]).astype(jnp.int32), hidden[0, length - 1]

  seq = jnp.zeros((1, size, width), jnp.float32).at[0, :n].set(prompt)
  tokens, hiddens = [], []
  for t in range(steps):
    tok, hidden = full(seq, n + t)
    tokens.append(int(tok))
    hiddens.append(np.asarray(hidden))
    seq = seq.at[0, n + t].set(llm.embed(tok[None, None])[0, 0])
  return np.asarray(tokens), np.stack(hiddens)


def test_kv_cache_greedy_matches_full_recompute(llm):
  rng = np.random.default_rng(0)
  prompts = [rng.standard_normal((n, 64)).astype(np.float32) for n in (5, 9, 7)]
  refs = [_reference_greedy(llm, p, T) for p in prompts]
  decode = jax.jit(lambda x, m: decode_loop(llm, x, m, max_new_tokens=T, eos_id=-1, pad_id=0))
  for side in ("left", "right", "both"):
    x, mask = _padded(prompts, side)
    out = decode(x, mask)
    for i, (ref_tokens, ref_hidden) in enumerate(refs):
      np.testing.assert_array_equal(np.asarray(out["tokens"][i]), ref_tokens, err_msg=f"{side} row {i}")
      # hidden[:, t] produced token t (the "previous" position of a [SEG] generated at step t).
      assert_close(f"hidden row {i} ({side} padding)", np.asarray(out["hidden"][i, :T]), ref_hidden,
                   rtol=1e-4)
    assert int(out["steps"]) == T
    np.testing.assert_array_equal(np.asarray(out["lengths"]), [T] * 3)
    assert len(set(map(tuple, np.asarray(out["tokens"]).tolist()))) > 1  # rows differ: a real check


def test_eos_ends_rows_and_loop_exits_early(llm):
  rng = np.random.default_rng(1)
  x, mask = _padded([rng.standard_normal((n, 64)).astype(np.float32) for n in (4, 6)], "left")
  eos, pad = 2, 0
  forced = jnp.asarray([[7, eos, 0, 0, 0, 0], [7, 8, 9, eos, 0, 0]], jnp.int32)
  out = decode_loop(llm, x, mask, max_new_tokens=T, eos_id=eos, pad_id=pad, forced_ids=forced,
                    forced_length=jnp.asarray([2, 4]))
  np.testing.assert_array_equal(np.asarray(out["tokens"]), [[7, eos, pad, pad, pad, pad],
                                                             [7, 8, 9, eos, pad, pad]])
  np.testing.assert_array_equal(np.asarray(out["lengths"]), [2, 4])
  assert int(out["steps"]) == 4  # left the loop as soon as both rows had </s>


def test_top_p_filter_keeps_the_nucleus():
  logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05], [0.05, 0.9, 0.03, 0.02]], jnp.float32))
  kept = np.isfinite(np.asarray(top_p_filter(logits, 0.7)))
  np.testing.assert_array_equal(kept, [[True, True, False, False], [False, True, False, False]])
  assert np.isfinite(np.asarray(top_p_filter(logits, 1.0))).all()


def test_sampling_is_seeded_per_row_not_per_batch(llm):
  rng = np.random.default_rng(2)
  prompts = [rng.standard_normal((n, 64)).astype(np.float32) for n in (5, 8)]
  kw = dict(max_new_tokens=T, eos_id=-1, pad_id=0, greedy=False, temperature=1.5, top_p=0.9, seed=11)
  x, mask = _padded(prompts, "left")
  both = decode_loop(llm, x, mask, row_seeds=jnp.asarray([5, 6]), **kw)["tokens"]
  x1, m1 = _padded(prompts[1:], "left")
  alone = decode_loop(llm, x1, m1, row_seeds=jnp.asarray([6]), **kw)["tokens"]
  np.testing.assert_array_equal(np.asarray(both[1]), np.asarray(alone[0]))
  other = decode_loop(llm, x, mask, row_seeds=jnp.asarray([5, 6]), **{**kw, "seed": 12})["tokens"]
  greedy = decode_loop(llm, x, mask, max_new_tokens=T, eos_id=-1, pad_id=0)["tokens"]
  assert not np.array_equal(np.asarray(both), np.asarray(other))
  assert not np.array_equal(np.asarray(both), np.asarray(greedy))


def _parse(tok, text, num_images=2, eos=True):
  ids = tok.encode(text) + ([tok.eos_id] if eos else [])
  return ids, parse_generation(ids, tok, num_images=num_images, seg_id=SEG_ID, p_start_id=P_START_ID,
                               p_end_id=P_END_ID)


def test_seg_routed_to_the_following_image_tag(tok):
  ids, a = _parse(tok, "<p> red circle </p> [SEG] (IMAGE2) and <p> blue square </p> [SEG] (IMAGE1). "
                       "Also (IMAGE2) again <p> green </p> [SEG] (IMAGE2)")
  assert ids.count(SEG_ID) == len(a.segs) == len(a.routed) == 3
  assert [s.image_index for s in a.segs] == [1, 0, 1]
  assert [s.phrase for s in a.segs] == ["red circle", "blue square", "green"]
  assert [s.token_index for s in a.segs] == [i for i, t in enumerate(ids) if t == SEG_ID]
  assert a.answer.startswith("<p> red circle </p> [SEG] (IMAGE2)")


def test_ill_formed_tags_drop_the_mask(tok):
  _, a = _parse(tok, "<p> a </p> [SEG] and <p> b </p> [SEG] (IMAGE7) then [SEG] (IMAGE1) <p> c </p> [SEG]",
                eos=False)
  assert [(s.image_index, s.reason) for s in a.segs] == [
      (None, "missing_tag"), (None, "image_out_of_range"), (0, None), (None, "missing_tag")]
  assert [s.phrase for s in a.segs] == ["a", "b", "", "c"]
  assert len(a.routed) == 1 and len(a.dropped) == 3


def test_tokens_after_eos_are_ignored(tok):
  ids = tok.encode("<p> cube </p> [SEG] (IMAGE1)") + [tok.eos_id] + tok.encode("<p> x </p> [SEG] (IMAGE1)")
  a = parse_generation(ids, tok, num_images=1, seg_id=SEG_ID, p_start_id=P_START_ID, p_end_id=P_END_ID)
  assert len(a.segs) == 1 and tok.eos_id not in a.token_ids


@pytest.mark.parametrize("resized,original",
                         [((64, 40), (130, 81)), ((37, 64), (20, 35)), ((64, 64), (64, 64))])
def test_low_res_to_original_matches_postprocess_masks(resized, original):
  low = np.random.default_rng(0).standard_normal((2, 16, 16)).astype(np.float32) * 4
  ours = low_res_to_original(low, 64, resized, original)
  ref = np.asarray(postprocess_masks(upscale_masks(jnp.asarray(low), 64), resized, original))
  assert ours.shape == (2, *original)
  assert_close(f"mask logits {resized}->{original}", ours, ref, rtol=1e-4)
