"""LLaMA decoder: parity with transformers' LlamaForCausalLM, strict loading, KV-cache decoding."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from prima_jax.convert import llama as convert_llama
from prima_jax.convert import state_dict as sd
from prima_jax.models import configs, llama, lora

from parity_utils import assert_close, test_seed


def _seed() -> int:
  return test_seed()


def _llm_cfg(num_kv_heads: int = 2, tie: bool = False):
  cfg = configs.tiny_config().llm
  cfg.update(vocab_size=256, num_heads=4, num_kv_heads=num_kv_heads, tie_word_embeddings=tie,
             rope_theta=5000.0)  # not HF's default theta: checks it is passed through
  return cfg


def _hf_model(cfg) -> transformers.LlamaForCausalLM:
  torch.manual_seed(_seed())
  hf_cfg = convert_llama.hf_llama_config(cfg)
  hf_cfg._attn_implementation = "eager"  # no NaN rows for fully padded queries
  model = transformers.LlamaForCausalLM(hf_cfg).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm.weight"):
        p.copy_(torch.empty_like(p).uniform_(0.5, 1.5))
  return model


def _padded_batch(rng: np.random.Generator, batch: int, length: int, vocab: int):
  """Random ids and a mask with row 0 right-padded, row 1 left-padded, row 2 unpadded."""
  ids = rng.integers(0, vocab, (batch, length)).astype(np.int32)
  mask = np.ones((batch, length), bool)
  mask[0, length - 3:] = False
  mask[1, :2] = False
  return ids, mask


@pytest.mark.parametrize("num_kv_heads,tie", [(2, False), (4, False), (2, True)],
                         ids=["grouped_kv", "mha", "tied"])
def test_logits_match_transformers(num_kv_heads, tie):
  cfg = _llm_cfg(num_kv_heads, tie)
  hf = _hf_model(cfg)
  model = llama.Llama(cfg, scan_layers=True, rngs=nnx.Rngs(_seed()))  # model.scan_layers' default
  report = sd.load_state_dict(model, hf.state_dict(), convert_llama.llama_rules(cfg),
                              ignore_unexpected=convert_llama.llama_ignored_keys(cfg))
  assert report.initialised == [] and report.missing == [] and report.unexpected == []

  rng = np.random.default_rng(_seed())
  ids, mask = _padded_batch(rng, 3, 10, cfg.vocab_size)
  logits, hidden, cache = nnx.jit(lambda m, i, a: m(m.embed(i), attention_mask=a))(model, ids, mask)
  assert cache is None and logits.dtype == jnp.float32 and hidden.shape == (3, 10, cfg.hidden_size)
  positions = np.asarray(llama.default_positions(jnp.asarray(mask)))
  with torch.no_grad():
    out = hf(input_ids=torch.as_tensor(ids, dtype=torch.long), attention_mask=torch.as_tensor(mask).long(),
             position_ids=torch.tensor(positions, dtype=torch.long), output_hidden_states=True)
  assert_close(f"llama logits ({num_kv_heads} kv heads, tie={tie})", np.asarray(logits)[mask],
               out.logits.numpy()[mask])
  assert_close(f"llama final hidden ({num_kv_heads} kv heads, tie={tie})", np.asarray(hidden)[mask],
               out.hidden_states[-1].numpy()[mask])
  exported = sd.export_state_dict(model, convert_llama.llama_rules(cfg))
  for key, value in exported.items():
    np.testing.assert_array_equal(value, hf.state_dict()[key].numpy(), err_msg=key)


def test_lora_model_loads_base_and_reports_exactly_the_adapters():
  cfg = _llm_cfg(2)
  lora_cfg = configs.tiny_config().lora
  hf = _hf_model(cfg)
  model = llama.Llama(cfg, lora_cfg, rngs=nnx.Rngs(_seed()))
  model.eval()
  report = sd.load_state_dict(model, hf.state_dict(), convert_llama.llama_rules(cfg, lora_cfg))
  expected = sorted(f"layers.{i}.self_attn.{p}.{ab}" for i in range(cfg.num_layers)
                    for p in ("q_proj", "v_proj") for ab in ("lora_a", "lora_b"))
  assert report.initialised == expected
  assert isinstance(model.layers[0].self_attn.q_proj, lora.LoRALinear)
  assert not isinstance(model.layers[0].self_attn.k_proj, lora.LoRALinear)

  rng = np.random.default_rng(_seed())
  ids, mask = _padded_batch(rng, 3, 8, cfg.vocab_size)
  logits, _, _ = model(model.embed(ids), attention_mask=mask)
  positions = np.asarray(llama.default_positions(jnp.asarray(mask)))
  with torch.no_grad():
    ref = hf(input_ids=torch.as_tensor(ids, dtype=torch.long), attention_mask=torch.as_tensor(mask).long(),
             position_ids=torch.tensor(positions, dtype=torch.long)).logits.numpy()
  assert_close("llama+lora(B=0) logits", np.asarray(logits)[mask], ref[mask])


def test_default_positions_and_remat_match():
  cfg = _llm_cfg(2)
  mask = jnp.array([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0]], bool)
  np.testing.assert_array_equal(llama.default_positions(mask), [[0, 0, 0, 1, 2], [0, 1, 2, 2, 2]])
  seed = _seed()
  plain = llama.Llama(cfg, rngs=nnx.Rngs(seed))
  remat = llama.Llama(cfg, remat=True, rngs=nnx.Rngs(seed))
  ids = np.random.default_rng(seed).integers(0, cfg.vocab_size, (2, 5))

  def loss(m):
    logits, _, _ = m(m.embed(ids), attention_mask=mask)
    return jnp.sum(jax.nn.log_softmax(logits)[..., 0] * mask)

  l1, g1 = nnx.value_and_grad(loss)(plain)
  l2, g2 = nnx.value_and_grad(loss)(remat)
  np.testing.assert_allclose(l1, l2, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), g1, g2)


@pytest.mark.parametrize("policy", ["dots_saveable", "dots_with_no_batch_dims_saveable"])
def test_remat_policies_match_and_recompute_less(policy):
  """Every remat policy gives the plain gradients; XLA's compiled FLOPs show what each recomputes."""
  cfg = _llm_cfg(2)
  seed = _seed()
  mask = jnp.ones((2, 8), bool)
  ids = np.random.default_rng(seed).integers(0, cfg.vocab_size, (2, 8))
  models = {name: llama.Llama(cfg, remat=name, rngs=nnx.Rngs(seed))
            for name in (False, "full", policy)}

  def loss(m):
    logits, _, _ = m(m.embed(ids), attention_mask=mask)
    return jnp.sum(jax.nn.log_softmax(logits)[..., 0])

  def compiled_flops(m):
    graph, state = nnx.split(m)
    fn = jax.jit(jax.grad(lambda s: loss(nnx.merge(graph, s))))
    return fn.lower(state).compile().cost_analysis()["flops"]

  flops = {name: compiled_flops(m) for name, m in models.items()}
  grads = {name: nnx.value_and_grad(loss)(m) for name, m in models.items()}
  for name in ("full", policy):
    np.testing.assert_allclose(grads[False][0], grads[name][0], rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), grads[False][1],
                 grads[name][1])
  # "full" runs every layer's forward again; a dots policy keeps (some) matmul outputs instead.
  assert flops["full"] > flops[policy] >= flops[False] * 0.999, flops
  with pytest.raises(ValueError, match="unknown remat policy"):
    llama.Llama(cfg, remat="dots", rngs=nnx.Rngs(seed))


def _last_real(mask: np.ndarray) -> np.ndarray:
  return mask.shape[1] - 1 - np.argmax(mask[:, ::-1], axis=1)


@pytest.mark.parametrize("num_kv_heads", [2, 4], ids=["grouped_kv", "mha"])
def test_kv_cache_greedy_decoding_matches_full_recompute(num_kv_heads):
  cfg = _llm_cfg(num_kv_heads)
  model = llama.Llama(cfg, configs.tiny_config().lora, scan_layers=True, rngs=nnx.Rngs(_seed()))
  model.eval()  # LoRA dropout off; randomise B so the adapters take part
  for m in lora.lora_modules(model):
    m.lora_b[...] = jax.random.normal(jax.random.key(_seed()), m.lora_b[...].shape) * 0.1
  rng = np.random.default_rng(_seed())
  prompt_len, steps, batch = 7, 4, 3
  ids, mask = _padded_batch(rng, batch, prompt_len, cfg.vocab_size)
  rows = np.arange(batch)

  @nnx.jit
  def step(m, tokens, tok_mask, cache):
    logits, _, cache = m(m.embed(tokens), attention_mask=tok_mask, cache=cache)
    return logits, cache

  @nnx.jit
  def full(m, tokens, tok_mask):
    return m(m.embed(tokens), attention_mask=tok_mask)[0]

  # Cached: prefill the padded prompt, then one token per step.
  cache = model.init_cache(batch, prompt_len + steps, jnp.float32)
  logits, cache = step(model, ids, mask, cache)
  next_logits = np.asarray(logits)[rows, _last_real(mask)]
  cached_tokens, cached_logits = [], []
  for _ in range(steps):
    token = next_logits.argmax(-1).astype(np.int32)
    cached_tokens.append(token)
    cached_logits.append(next_logits)
    logits, cache = step(model, token[:, None], np.ones((batch, 1), bool), cache)
    next_logits = np.asarray(logits)[:, -1]
  assert int(cache.index) == prompt_len + steps

  # Reference: recompute the whole (prompt + generated) sequence without a cache every step.
  seq, seq_mask = ids, mask
  for t in range(steps):
    logits = np.asarray(full(model, seq, seq_mask))
    ref_logits = logits[rows, _last_real(seq_mask)]
    token = ref_logits.argmax(-1).astype(np.int32)
    np.testing.assert_array_equal(cached_tokens[t], token, err_msg=f"step {t}")
    assert_close(f"kv-cache step {t} logits ({num_kv_heads} kv heads)", cached_logits[t], ref_logits)
    seq = np.concatenate([seq, token[:, None]], axis=1)
    seq_mask = np.concatenate([seq_mask, np.ones((batch, 1), bool)], axis=1)
  np.testing.assert_array_equal(np.asarray(cache.mask), seq_mask[:, :prompt_len + steps])
