"""``python -m prima_jax.convert``: a training checkpoint -> transformers models with our outputs, and
bit-exact round trips through both PyTorch layouts."""

import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import torch
import transformers
from flax import nnx

from prima_jax import cli
from prima_jax.convert import __main__ as convert
from prima_jax.convert import torch_io
from prima_jax.models.configs import tiny_config
from prima_jax.models.prima import Prima
from prima_jax.training.checkpoint import Checkpointer
from prima_jax.training.defaults import TRAINABLE_PRIMA, base_config
from prima_jax.training.optimizer import make_optimizer

from parity_utils import assert_close


def _config():
  model = tiny_config()
  model.llm.vocab_size = 300
  model.prima.first_added_id = 293   # the added tokens are the last 7 ids
  model.lora.dropout = 0.0
  model.scan_layers = True   # the stacked layout, as the full-size model trains (tiny_config is unrolled)
  model.vision.ln_vision_eps = model.vision.layer_norm_eps  # HF post_layernorm uses the blocks' eps
  config = base_config(model)
  config.train.trainable = TRAINABLE_PRIMA  # frozen parameters live in their own checkpoint item
  return config


@pytest.fixture(scope="module")
def work(tmp_path_factory):
  """A training workdir whose checkpoint holds random values for every parameter (LoRA B included)."""
  config = _config()
  names = torch_io.abstract_params(config.model)
  rng = np.random.default_rng(0)
  values = {n: rng.normal(0, 0.1, v.get_value().shape).astype(np.float32) for n, v in names.items()}
  for n in values:
    if n.endswith("qkv.kernel"):  # keep EVA logits moderate
      values[n] *= 0.5
  root = tmp_path_factory.mktemp("convert")
  workdir = str(root / "work")
  # 128 KiB groups: the ~1 MiB checkpoint is written in several partial saves per item.
  torch_io.write_checkpoint(config, values, workdir, meta={"step": 0}, group_bytes=128 << 10)
  return config, values, workdir, root


def _run(*argv):
  return cli.call(convert, [str(a) for a in argv])


def _checkpoint_values(path):
  source = torch_io.CheckpointParams(torch_io.find_step_dir(path))
  return source.read(list(source.shapes))


def test_written_checkpoint_restores_with_the_training_code(work):
  config, values, workdir, _ = work
  sds = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype)  # noqa: E731
  source = torch_io.CheckpointParams(torch_io.find_step_dir(workdir))
  assert set(source.shapes) == set(values)
  state_dir = os.path.join(workdir, "checkpoints", "0", "state")
  meta = ocp.PyTreeCheckpointer().metadata(state_dir).item_metadata.tree
  params = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), meta["params"])
  assert set(params) == {"square", "language_projection", "llm", "seg_head", "sam"}
  assert os.path.isdir(os.path.join(workdir, "frozen"))  # frozen parameters: WORKDIR/frozen
  tx, _ = make_optimizer(config.optimizer, config.train.num_steps)
  target = dict(step=jax.ShapeDtypeStruct((), jnp.int32), params=params,
                opt_state=jax.eval_shape(tx.init, params), rng=jax.ShapeDtypeStruct((2,), jnp.uint32))
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=1, async_save=False)
  state, meta = ckpt.restore(0, jax.tree.map(sds, target))
  ckpt.close()
  assert int(state["step"]) == 0 and meta["step"] == 0
  # scanned layers (model.scan_layers): layer 1's adapter is group 1 of the stacked one
  lora_b = state["params"]["llm"]["layers"]["0"]["self_attn"]["v_proj"]["lora_b"]
  np.testing.assert_array_equal(np.asarray(lora_b), values["llm.layers.0.self_attn.v_proj.lora_b"])
  assert lora_b.shape[0] == config.model.llm.num_layers


def test_hf_export_loads_into_transformers_and_matches_our_outputs(work):
  config, _, workdir, root = work
  cfg = config.model
  out = root / "hf_merged"
  assert _run("to-torch", "--checkpoint", workdir, "--out", out, "--layout", "hf", "--merge_lora",
              "--max_shard_size", "300KB") == 0
  ib, info = transformers.InstructBlipForConditionalGeneration.from_pretrained(
      out / "instructblip", output_loading_info=True, attn_implementation="eager")
  assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
  sam, info = transformers.SamModel.from_pretrained(out / "sam", output_loading_info=True,
                                                    attn_implementation="eager")
  assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
  ib.eval()
  sam.eval()

  ours = nnx.eval_shape(lambda: Prima(cfg, rngs=nnx.Rngs(5)))  # values come from the checkpoint
  torch_io.load_params(workdir, ours)  # unmerged: the LoRA path is live
  ours.eval()
  nq = cfg.qformer.num_query_tokens
  rng = np.random.default_rng(1)
  images = rng.normal(size=(2, cfg.vision.image_size, cfg.vision.image_size, 3)).astype(np.float32)
  ids = rng.integers(1, cfg.qformer.vocab_size, (2, 5)).astype(np.int32)
  text_mask = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], bool)
  llm_ids = rng.integers(0, cfg.llm.vocab_size, (2, 11)).astype(np.int32)
  mask = np.ones((2, 11), bool)
  s = cfg.sam
  sam_images = rng.normal(size=(2, s.image_size, s.image_size, 3)).astype(np.float32)
  sparse = rng.normal(size=(2, 1, s.prompt_embed_dim)).astype(np.float32)

  @nnx.jit
  def forward(m):
    feat = m.vision(jnp.asarray(images))
    queries = jnp.broadcast_to(m.qformer.query_tokens[...][None], (2, nq, cfg.qformer.hidden_size))
    q = m.qformer(queries, jnp.asarray(ids), jnp.asarray(text_mask), feat)
    logits, _, _ = m.llm(m.llm.embed(jnp.asarray(llm_ids)), attention_mask=jnp.asarray(mask))
    emb = m.sam.encode(jnp.asarray(sam_images))
    return dict(feat=feat, q=q, tokens=m.language_projection(q[:, :nq]), logits=logits, emb=emb,
                masks=m.sam.decode(emb, jnp.asarray(sparse)))

  got = forward(ours)
  with torch.no_grad():
    ref_feat = ib.vision_model(pixel_values=torch.from_numpy(images).permute(0, 3, 1, 2)).last_hidden_state
    qmask = torch.cat([torch.ones(2, nq).long(), torch.from_numpy(text_mask).long()], 1)
    ref_q = ib.qformer(input_ids=torch.from_numpy(ids).long(), attention_mask=qmask,
                       query_embeds=ib.query_tokens.expand(2, -1, -1),
                       encoder_hidden_states=ref_feat).last_hidden_state
    ref_tokens = ib.language_projection(ref_q[:, :nq])
    ref_logits = ib.language_model(input_ids=torch.from_numpy(llm_ids).long(),
                                   attention_mask=torch.from_numpy(mask).long()).logits
    emb = sam.get_image_embeddings(torch.from_numpy(sam_images).permute(0, 3, 1, 2))
    pe = sam.get_image_wide_positional_embeddings().repeat(2, 1, 1, 1)
    _, dense = sam.prompt_encoder(None, None, None, None)
    ref_masks, _ = sam.mask_decoder(emb, pe, torch.from_numpy(sparse)[:, None], dense.expand(2, -1, -1, -1),
                                    multimask_output=False)
  assert_close("hf export: vision features", got["feat"], ref_feat, rtol=1e-5)
  assert_close("hf export: Q-Former output", got["q"], ref_q, rtol=1e-5)
  assert_close("hf export: projected image tokens", got["tokens"], ref_tokens, rtol=1e-5)
  assert_close("hf export (merged LoRA) vs unmerged LLM logits", got["logits"], ref_logits, rtol=1e-5)
  assert_close("hf export: SAM image embeddings", got["emb"], emb.permute(0, 2, 3, 1), rtol=1e-5)
  assert_close("hf export: SAM masks", got["masks"], ref_masks[:, 0, 0], rtol=1e-5)
  assert (out / "prima_extra" / "model.safetensors.index.json").exists()
  assert not (out / "instructblip" / "adapter_model.safetensors").exists()


def assert_progress_line(err: str, desc: str) -> None:
  """Off a terminal (pytest captures stderr): plain progress lines, the last one complete, with the count
  of tensors, the rate and the time left."""
  assert "\r" not in err
  lines = [line for line in err.splitlines() if line.startswith(f"{desc}:")]
  assert lines, err
  found = re.fullmatch(rf"{desc}: 100%\|.*\| (\d+)/(\d+) \[\d\d:\d\d<00:00, +[\d.]+ tensors/s\]", lines[-1])
  assert found and found[1] == found[2] and int(found[1]) > 0, lines[-1]


@pytest.mark.parametrize("layout", ["prima", "hf"])
def test_round_trip_is_bit_exact_and_complete(work, layout, capsys):
  config, values, workdir, root = work
  exported = root / f"export_{layout}"
  capsys.readouterr()
  assert _run("to-torch", "--checkpoint", workdir, "--out", exported, "--layout", layout,
              "--max_shard_size", "1MB") == 0
  assert_progress_line(capsys.readouterr().err, "to-torch")
  if layout == "hf":
    assert (exported / "instructblip" / "adapter_model.safetensors").exists()
    assert (exported / "instructblip" / "adapter_config.json").exists()
  back = root / f"back_{layout}"
  source = ["--prima", exported] if layout == "prima" else ["--hf", exported]
  assert _run("from-torch", "--config", os.path.join(workdir, "config.json"), "--out", back, *source,
              "--strict", "--write_size", "200KB") == 0
  captured = capsys.readouterr()
  assert_progress_line(captured.err, "from-torch")
  printed = captured.out
  assert "freshly initialised (0): none" in printed and "unexpected keys, ignored (0): none" in printed
  assert "absent optional keys" not in printed
  assert sorted(os.listdir(back)) == ["checkpoints", "config.json", "frozen"]  # no parts left behind
  got = _checkpoint_values(back)
  assert set(got) == set(values)
  for name, value in values.items():
    assert got[name].dtype == value.dtype, name
    np.testing.assert_array_equal(got[name], value, err_msg=name)


def test_instructblip_plus_sam_start_initialises_the_new_parts(work, capsys):
  _, _, workdir, root = work
  exported = root / "export_hf"
  if not exported.exists():
    assert _run("to-torch", "--checkpoint", workdir, "--out", exported, "--layout", "hf") == 0
  capsys.readouterr()
  assert _run("from-torch", "--config", os.path.join(workdir, "config.json"), "--out", root / "start",
              "--instructblip", exported / "instructblip", "--sam", exported / "sam") == 0
  printed = capsys.readouterr().out
  line = next(x for x in printed.splitlines() if x.startswith("freshly initialised"))
  assert "square.relational_queries" in line and "seg_head.fc1.kernel" in line and "llm" not in line


def test_no_overwrite_and_no_partial_output(work, capsys):
  config, _, workdir, root = work
  out = root / "guarded"
  out.mkdir()
  (out / "keep.txt").write_text("x")
  assert _run("to-torch", "--checkpoint", workdir, "--out", out) == 2
  assert "--overwrite" in capsys.readouterr().err and (out / "keep.txt").exists()

  # a failing import (a misshapen tensor) leaves neither the output nor a temporary directory
  exported = root / "export_bad"
  assert _run("to-torch", "--checkpoint", workdir, "--out", exported) == 0
  lazy = torch_io.open_state_dict(str(exported))
  state = {k: lazy[k] for k in lazy}
  state["base_model.model.model.norm.weight"] = np.zeros(7, np.float32)  # unmerged: PEFT-wrapped names
  writer = torch_io.SafetensorsWriter(str(root / "bad_state"))
  for k, v in state.items():
    writer.add(k, v)
  writer.close()
  before = set(os.listdir(root))
  assert _run("from-torch", "--config", os.path.join(workdir, "config.json"), "--out", root / "never",
              "--prima", root / "bad_state") == 2
  err = capsys.readouterr().err
  assert "base_model.model.model.norm.weight: shape (7,)" in err and "expected (64,)" in err
  assert set(os.listdir(root)) == before

  assert _run("to-torch", "--checkpoint", workdir, "--out", out, "--overwrite", "--dtype", "bfloat16") == 0
  assert not (out / "keep.txt").exists() and (out / "model.safetensors.index.json").exists()
  lazy = torch_io.open_state_dict(str(out))
  assert lazy["base_model.model.lm_head.weight"].dtype.name == "bfloat16"
  del config
