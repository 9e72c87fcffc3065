"""QFormer against transformers' InstructBlipQFormerModel, and strict loading of its table."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from prima_jax.convert import instructblip as ib
from prima_jax.convert import state_dict as sd
from prima_jax.models import configs, qformer

from parity_utils import assert_close, assert_same_loss_and_grads, randomise_torch, test_seed


def _seed() -> int:
  return test_seed()


def _hf_qformer(cfg):
  torch.manual_seed(_seed())
  model = transformers.InstructBlipQFormerModel(ib.hf_qformer_config(cfg)).eval()
  randomise_torch(model)
  return model


def _loaded_pair(cfg):
  """(HF model, our model with its weights, query tokens [1, nq, hidden] as torch)."""
  hf = _hf_qformer(cfg)
  query_tokens = torch.randn(1, cfg.num_query_tokens, cfg.hidden_size) * 0.5
  state = dict(hf.state_dict(), query_tokens=query_tokens)
  ours = qformer.QFormer(cfg, scan_layers=True, rngs=nnx.Rngs(_seed()))  # model.scan_layers' default
  report = sd.load_state_dict(ours, state, ib.qformer_rules(cfg) + [ib.query_tokens_rule(cfg)],
                              strict=True, ignore_unexpected=ib.QFORMER_IGNORED_PREFIXES)
  assert report.initialised == []
  assert len(report.loaded) == len(sd.unrolled_param_shapes(ours))
  return hf, ours, query_tokens


def _inputs(cfg, batch=3, text_len=7, image_tokens=5):
  rng = np.random.default_rng(_seed())
  ids = rng.integers(1, cfg.vocab_size, size=(batch, text_len)).astype(np.int32)
  lengths = np.array([text_len, 4, 1])[:batch]  # rows 1 and 2 padded at the end
  text_mask = np.arange(text_len)[None] < lengths[:, None]
  ids = np.where(text_mask, ids, cfg.get("pad_token_id", 0)).astype(np.int32)
  queries = rng.normal(size=(batch, cfg.num_query_tokens, cfg.hidden_size)).astype(np.float32)
  image = rng.normal(size=(batch, image_tokens, cfg.encoder_width)).astype(np.float32)
  image_mask = np.ones((batch, image_tokens), bool)
  image_mask[1, 3:] = False
  image_mask[2, 1:] = False
  return queries, ids, text_mask, image, image_mask


def _hf_forward(hf, queries, ids, text_mask, image, image_mask=None):
  batch, nq = queries.shape[:2]
  attention_mask = np.concatenate([np.ones((batch, nq), bool), text_mask], axis=1)
  with torch.no_grad():
    out = hf(input_ids=torch.from_numpy(ids).long(),
             attention_mask=torch.from_numpy(attention_mask).long(),
             query_embeds=torch.from_numpy(queries),
             encoder_hidden_states=torch.from_numpy(image),
             encoder_attention_mask=None if image_mask is None else torch.from_numpy(image_mask).long())
  return out.last_hidden_state.numpy()


def test_parity_with_hf_instructblip_qformer():
  cfg = configs.tiny_config().qformer
  hf, ours, query_tokens = _loaded_pair(cfg)
  queries, ids, text_mask, image, image_mask = _inputs(cfg)
  forward = jax.jit(lambda m, *a: m(*a))
  out = forward(ours, jnp.asarray(queries), jnp.asarray(ids), jnp.asarray(text_mask), jnp.asarray(image))
  assert out.shape == (3, cfg.num_query_tokens + ids.shape[1], cfg.hidden_size)
  ref = _hf_forward(hf, queries, ids, text_mask, image)
  # HF computes every position; padded text positions are garbage on both sides but must agree too.
  assert_close("qformer last_hidden_state", out, ref, rtol=1e-4)

  out = forward(ours, jnp.asarray(queries), jnp.asarray(ids), jnp.asarray(text_mask), jnp.asarray(image),
                jnp.asarray(image_mask))
  assert_close("qformer with image mask", out, _hf_forward(hf, queries, ids, text_mask, image, image_mask),
               rtol=1e-4)

  # query_embeds=None uses the loaded query tokens.
  tokens = np.broadcast_to(query_tokens.numpy(), queries.shape).copy()
  out = forward(ours, None, jnp.asarray(ids), jnp.asarray(text_mask), jnp.asarray(image))
  assert_close("qformer with query_tokens", out, _hf_forward(hf, tokens, ids, text_mask, image), rtol=1e-4)


def test_padded_text_is_masked():
  """Changing padded token ids leaves every non-padded position unchanged."""
  cfg = configs.tiny_config().qformer
  ours = qformer.QFormer(cfg, rngs=nnx.Rngs(_seed()))
  queries, ids, text_mask, image, _ = _inputs(cfg)
  other = np.where(text_mask, ids, (ids + 17) % cfg.vocab_size).astype(np.int32)
  forward = nnx.jit(lambda m, i: m(jnp.asarray(queries), i, jnp.asarray(text_mask), jnp.asarray(image)))
  a, b = forward(ours, jnp.asarray(ids)), forward(ours, jnp.asarray(other))
  nq = cfg.num_query_tokens
  keep = np.concatenate([np.ones((ids.shape[0], nq), bool), text_mask], axis=1)
  np.testing.assert_allclose(np.asarray(a)[keep], np.asarray(b)[keep], rtol=1e-6, atol=1e-6)
  assert not np.allclose(np.asarray(a)[~keep], np.asarray(b)[~keep])


def _state_and_rules(cfg):
  hf = transformers.InstructBlipQFormerModel(ib.hf_qformer_config(cfg))
  state = dict(hf.state_dict(), query_tokens=torch.zeros(1, cfg.num_query_tokens, cfg.hidden_size))
  return state, ib.qformer_rules(cfg) + [ib.query_tokens_rule(cfg)]


def test_strict_load_names_missing_unexpected_and_misshapen_keys():
  cfg = configs.tiny_config().qformer
  state, rules = _state_and_rules(cfg)
  ours = qformer.QFormer(cfg, rngs=nnx.Rngs(0))
  sd.load_state_dict(ours, state, rules)  # the complete dict loads

  key = "encoder.layer.1.output_query.dense.weight"
  missing = {k: v for k, v in state.items() if k != key}
  with pytest.raises(ValueError, match=f"missing {key}"):
    sd.load_state_dict(ours, missing, rules)

  unexpected = dict(state, **{"encoder.layer.0.surprise.weight": torch.zeros(2)})
  with pytest.raises(ValueError, match="unexpected encoder.layer.0.surprise.weight"):
    sd.load_state_dict(ours, unexpected, rules)

  key = "encoder.layer.0.crossattention.attention.key.weight"
  misshapen = dict(state, **{key: torch.zeros(cfg.hidden_size, cfg.hidden_size + 1)})
  with pytest.raises(ValueError, match=key):
    sd.load_state_dict(ours, misshapen, rules)

  misshapen = dict(state, query_tokens=torch.zeros(1, cfg.num_query_tokens + 1, cfg.hidden_size))
  with pytest.raises(ValueError, match="query_tokens"):
    sd.load_state_dict(ours, misshapen, rules)


def test_position_ids_buffer_is_ignored():
  cfg = configs.tiny_config().qformer
  state, rules = _state_and_rules(cfg)
  state["embeddings.position_ids"] = torch.arange(cfg.max_position_embeddings)[None]
  ours = qformer.QFormer(cfg, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="unexpected embeddings.position_ids"):
    sd.load_state_dict(ours, state, rules)
  report = sd.load_state_dict(ours, state, rules, ignore_unexpected=ib.QFORMER_IGNORED_PREFIXES)
  assert report.unexpected == [] and report.initialised == []
  nested = sd.prefix_rules(rules, "qformer.")
  nested_state = {"qformer." + k: v for k, v in state.items()}
  sd.load_state_dict(ours, nested_state, nested, ignore_unexpected=ib.ignored_keys(nested_state))


def test_every_param_has_logical_axes():
  cfg = configs.tiny_config().qformer
  ours = qformer.QFormer(cfg, rngs=nnx.Rngs(0))
  for path, variable in sd.param_paths(ours).items():
    axes = variable.get_metadata().get("logical_axes")
    assert axes is not None and len(axes) == variable[...].ndim, (path, axes)
  assert ours.query_tokens.get_metadata()["logical_axes"] == ("queries", "embed")


def test_remat_matches_and_differentiates():
  cfg = configs.tiny_config().qformer
  seed = _seed()
  plain = qformer.QFormer(cfg, rngs=nnx.Rngs(seed))
  remat = qformer.QFormer(cfg, remat=True, rngs=nnx.Rngs(seed))
  queries, ids, text_mask, image, image_mask = _inputs(cfg)
  args = tuple(jnp.asarray(x) for x in (queries, ids, text_mask, image, image_mask))

  def loss(model):
    return jnp.sum(model(*args) ** 2)

  g1 = assert_same_loss_and_grads(plain, remat, loss, atol=1e-5)
  assert float(jnp.max(jnp.abs(g1["layers"][0]["crossattention"]["key"]["kernel"][...]))) > 0
