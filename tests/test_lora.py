"""LoRA: no-op at init, merge/unmerge, dropout modes, PEFT-name round trip."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from prima_jax.convert import llama as convert_llama
from prima_jax.convert import state_dict as sd
from prima_jax.models import configs, llama, lora

from parity_utils import test_seed


def _seed() -> int:
  return test_seed()


def _cfgs(dropout: float = 0.05):
  c = configs.tiny_config()
  c.llm.update(vocab_size=256)
  c.lora.update(dropout=dropout)
  return c.llm, c.lora


def _inputs(cfg, batch=2, length=6):
  rng = np.random.default_rng(_seed())
  ids = rng.integers(0, cfg.vocab_size, (batch, length)).astype(np.int32)
  mask = np.ones((batch, length), bool)
  mask[0, -2:] = False
  return ids, mask


def _forward(model, ids, mask):
  return np.asarray(model(model.embed(ids), attention_mask=mask)[0])


def _randomise_b(model, scale=0.5):
  key = jax.random.key(_seed())
  for i, m in enumerate(lora.lora_modules(model)):
    m.lora_b[...] = scale * jax.random.normal(jax.random.fold_in(key, i), m.lora_b[...].shape)


def test_lora_param_is_a_param_and_selectable():
  assert issubclass(lora.LoRAParam, nnx.Param)
  cfg, lora_cfg = _cfgs()
  model = llama.Llama(cfg, lora_cfg, rngs=nnx.Rngs(_seed()))
  adapters = [sd.path_str(p) for p, _ in nnx.to_flat_state(nnx.state(model, lora.LoRAParam))]
  assert adapters == sorted(f"layers.{i}.self_attn.{p}.{ab}" for i in range(cfg.num_layers)
                            for p in ("q_proj", "v_proj") for ab in ("lora_a", "lora_b"))
  assert len(lora.lora_modules(model)) == 2 * cfg.num_layers
  for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    assert v.get_metadata().get("logical_axes") is not None, p
  q = model.layers[0].self_attn.q_proj
  assert q.lora_a.get_metadata()["logical_axes"] == ("embed", "lora_rank")
  assert q.lora_b.get_metadata()["logical_axes"] == ("lora_rank", "heads")
  assert q.scaling == lora_cfg.alpha / lora_cfg.rank


def test_lora_linear_math_and_init():
  in_f, out_f, rank, alpha = 64, 24, 4, 8.0
  layer = lora.LoRALinear(in_f, out_f, ("embed", "mlp"), rank=rank, alpha=alpha, rngs=nnx.Rngs(_seed()))
  a = np.asarray(layer.lora_a[...])
  bound = 1 / math.sqrt(in_f)  # PEFT kaiming_uniform_(a=sqrt(5))
  assert a.shape == (in_f, rank) and np.abs(a).max() <= bound and np.abs(a).max() > 0.5 * bound
  np.testing.assert_array_equal(layer.lora_b[...], 0)
  layer.lora_b[...] = jax.random.normal(jax.random.key(_seed()), (rank, out_f))
  x = jax.random.normal(jax.random.key(_seed()), (3, 5, in_f))
  expected = x @ layer.base.kernel[...] + (x @ layer.lora_a[...] @ layer.lora_b[...]) * (alpha / rank)
  np.testing.assert_allclose(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_fresh_lora_changes_nothing():
  cfg, lora_cfg = _cfgs()
  plain = llama.Llama(cfg, rngs=nnx.Rngs(_seed()))
  adapted = llama.Llama(cfg, lora_cfg, rngs=nnx.Rngs(_seed()))
  weights = sd.export_state_dict(plain, convert_llama.llama_rules(cfg))
  report = sd.load_state_dict(adapted, weights, convert_llama.llama_rules(cfg, lora_cfg))
  assert all(".lora_" in p for p in report.initialised) and report.initialised
  ids, mask = _inputs(cfg)
  # Train mode (dropout active on the LoRA path): B = 0 still contributes nothing.
  np.testing.assert_allclose(_forward(adapted, ids, mask), _forward(plain, ids, mask), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_merge_unmerge(scan_layers):
  cfg, lora_cfg = _cfgs()
  model = llama.Llama(cfg, lora_cfg, scan_layers=scan_layers, rngs=nnx.Rngs(_seed()))
  model.eval()
  ids, mask = _inputs(cfg)
  base_before = _forward_without_lora(model, ids, mask)
  _randomise_b(model)
  kernels = [np.asarray(m.base.kernel[...]) for m in lora.lora_modules(model)]
  unmerged = _forward(model, ids, mask)
  assert np.max(np.abs(unmerged - base_before)) > 1e-3 * np.max(np.abs(base_before))  # adapters matter

  assert lora.merge_lora(model) == len(kernels)
  assert lora.merge_lora(model) == 0  # idempotent
  merged = _forward(model, ids, mask)
  scale = np.max(np.abs(unmerged))
  np.testing.assert_allclose(merged, unmerged, rtol=0, atol=1e-5 * scale)
  # Merged layers skip the LoRA path: changing B now has no effect.
  saved_b = [np.asarray(m.lora_b[...]) for m in lora.lora_modules(model)]
  for m in lora.lora_modules(model):
    m.lora_b[...] = m.lora_b[...] + 1.0
  np.testing.assert_array_equal(_forward(model, ids, mask), merged)
  for m, b in zip(lora.lora_modules(model), saved_b):
    m.lora_b[...] = jnp.asarray(b)

  assert lora.unmerge_lora(model) == len(kernels)
  for m, k in zip(lora.lora_modules(model), kernels):
    assert not m.merged
    np.testing.assert_allclose(m.base.kernel[...], k, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(_forward(model, ids, mask), unmerged, rtol=0, atol=1e-5 * scale)


def _forward_without_lora(model, ids, mask):
  """Logits with every adapter's B temporarily zeroed."""
  saved = [np.asarray(m.lora_b[...]) for m in lora.lora_modules(model)]
  for m in lora.lora_modules(model):
    m.lora_b[...] = jnp.zeros_like(m.lora_b[...])
  out = _forward(model, ids, mask)
  for m, b in zip(lora.lora_modules(model), saved):
    m.lora_b[...] = jnp.asarray(b)
  return out


@pytest.mark.parametrize("scan_layers", [False, True])
def test_dropout_train_vs_eval(scan_layers):
  cfg, lora_cfg = _cfgs(dropout=0.5)
  model = llama.Llama(cfg, lora_cfg, scan_layers=scan_layers, rngs=nnx.Rngs(_seed()))
  _randomise_b(model)
  ids, mask = _inputs(cfg)
  fwd = nnx.jit(_forward_logits)
  model.train()
  a, b = np.asarray(fwd(model, ids, mask)), np.asarray(fwd(model, ids, mask))
  assert np.max(np.abs(a - b)) > 1e-4 * np.max(np.abs(a)), "train-mode dropout should resample"
  model.eval()
  assert all(m.dropout.deterministic for m in lora.lora_modules(model))
  c, d = np.asarray(fwd(model, ids, mask)), np.asarray(fwd(model, ids, mask))
  np.testing.assert_array_equal(c, d)
  assert np.max(np.abs(a - c)) > 1e-4 * np.max(np.abs(c))


def _forward_logits(model, ids, mask):
  return model(model.embed(ids), attention_mask=mask)[0]


def test_peft_names_round_trip():
  cfg, lora_cfg = _cfgs()
  src = llama.Llama(cfg, lora_cfg, rngs=nnx.Rngs(_seed()))
  src.eval()
  _randomise_b(src)
  rules = convert_llama.llama_rules(cfg, lora_cfg) + convert_llama.lora_rules(cfg, lora_cfg)
  exported = sd.export_state_dict(src, rules)
  head_dim = cfg.hidden_size // cfg.num_heads
  key = "base_model.model.model.layers.1.self_attn.v_proj"
  assert exported[f"{key}.lora_A.default.weight"].shape == (lora_cfg.rank, cfg.hidden_size)
  assert exported[f"{key}.lora_B.default.weight"].shape == (cfg.num_kv_heads * head_dim, lora_cfg.rank)
  assert "model.layers.1.self_attn.v_proj.weight" in exported
  assert len(convert_llama.lora_rules(cfg, lora_cfg)) == 4 * cfg.num_layers
  assert convert_llama.lora_rules(cfg, None) == []

  # PEFT semantics in torch layout: W_eff = W + scaling * B @ A equals our merged kernel (transposed).
  w = exported["model.layers.1.self_attn.v_proj.weight"]
  w_eff = w + (lora_cfg.alpha / lora_cfg.rank) * (exported[f"{key}.lora_B.default.weight"]
                                                  @ exported[f"{key}.lora_A.default.weight"])

  dst = llama.Llama(cfg, lora_cfg, rngs=nnx.Rngs(_seed()))
  dst.eval()
  report = sd.load_state_dict(dst, exported, rules)
  assert report.initialised == [] and len(report.loaded) == len(rules)
  for (p, a), (_, b) in zip(nnx.to_flat_state(nnx.state(src, nnx.Param)),
                            nnx.to_flat_state(nnx.state(dst, nnx.Param))):
    np.testing.assert_array_equal(a[...], b[...], err_msg=sd.path_str(p))
  ids, mask = _inputs(cfg)
  np.testing.assert_array_equal(_forward(dst, ids, mask), _forward(src, ids, mask))

  lora.merge_lora(dst)
  np.testing.assert_allclose(np.asarray(dst.layers[1].self_attn.v_proj.base.kernel[...]).T, w_eff,
                             rtol=1e-6, atol=1e-6)
  # adapter_model.safetensors naming (no adapter name) also loads.
  names = {r.torch_key for r in convert_llama.lora_rules(cfg, lora_cfg, adapter_name=None)}
  assert f"{key}.lora_A.weight" in names
