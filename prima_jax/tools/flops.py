r"""Per-example FLOPs of PRIMA, GLaMM-style and LISA-style models, counted by XLA and analytically.

  python -m prima_jax.tools.flops --config=configs/m4seg.py \
      [--images=3 --prompt_tokens=100 --answer_tokens=64 --masks=3 --generate --sweep]
  python -m prima_jax.tools.flops --config=configs/m4seg.py --training \
      [--images=3 --micro_batch=K --mesh=data,fsdp,tensor --fake_devices=N --json]

``--training`` (:func:`training_costs`) instead compiles the config's train step (forward + backward +
optimizer update as XLA compiles it, remat included; one micro-batch, no gradient-accumulation scan) on
abstract inputs for three batches: ``online`` (uint8 images for EVA and SAM), ``sam_cached`` (cached
SAM image embeddings) and ``sam_eva_cached`` (cached SAM and EVA features), and prints the compiled
FLOPs per example and the per-device memory of each.

Every component of each model (vision encoder, SQuARE, Q-Former, projector, LLM, [SEG] head, SAM
image encoder, SAM mask decoder) is lowered separately at full size with ``jax.ShapeDtypeStruct``
inputs and abstract parameters (``nnx.eval_shape``: no weight is ever allocated), and XLA's
``cost_analysis()['flops']`` of the lowered (not compiled) program is read. The count is the one
of the StableHLO the model emits: every ``dot_general`` / convolution at 2 FLOPs per multiply-add,
plus one FLOP per element of elementwise ops (norms, softmax, activations, masking). XLA counts a
``while`` loop (``scan`` / ``fori_loop``) body once, so :func:`xla_flops` refuses programs with loops
and :func:`loop_flops` counts a body times its trip count; none of the models here loops (their
layers are unrolled Python loops) and no remat is applied (inference).

An independent analytic count (:func:`analytic_counts`) sums 2·m·n·k over every matmul and
convolution plus attention's QKᵀ and PV (2·q·k·d each, over all heads, full rectangles, no causal
saving). It excludes elementwise work (LayerNorm / RMSNorm, softmax, GELU / SiLU, RoPE, biases,
residuals, masks), embedding look-ups and the scatter of image tokens. The two must agree within
:data:`AGREEMENT_TOLERANCE` per component; the difference is that elementwise work.

Protocol (printed with the table): ``--images`` N per example (all valid), ``--prompt_tokens`` P text
tokens of the prompt (system prompt + question; image tokens come on top, plus ``<im_start>`` /
``<im_end>`` per image), ``--answer_tokens`` A, ``--masks`` M [SEG] masks, batch 1, the config's
compute dtype, LoRA merged (inference). Without ``--generate`` one teacher-forced forward over the
whole sequence (P + image tokens + A; logits at every position). With ``--generate``: a prefill
over P + image tokens (logits at every position, as Hugging Face ``generate``), then A decode steps
with a KV cache, step j attending to the prefill + j cached tokens (the growing cache of Hugging
Face; the step cost is affine in the cache length, so it is lowered at the first and last step's
cache length and summed exactly). The [SEG] head and the SAM decoder run once per mask, the SAM
encoder once per image. GLaMM/LISA see a multi-image example either ``joint`` (all images' tokens in
one sequence) or ``per_image`` (N passes, each with the prompt and one image; the answer tokens and
masks are split across the passes).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import itertools
import json
import math
import re
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from absl import app, flags, logging
from flax import nnx
from ml_collections import config_flags

from prima_jax import cli
from prima_jax.models import baselines, clip_vit, layers
from prima_jax.models.eva_vit import EvaViT
from prima_jax.models.llama import Llama
from prima_jax.models.prima import SegHead
from prima_jax.models.qformer import QFormer
from prima_jax.models.sam.sam import Sam
from prima_jax.models.square import Square

AGREEMENT_TOLERANCE = 0.02
PAPER = dict(lisa=88.9, glamm=83.0, prima=62.0)        # the paper's v1 efficiency table (TFLOPs)
PAPER_REDUCTION = (PAPER["glamm"] - PAPER["prima"]) / PAPER["glamm"]
COMPONENTS = ("vision encoder", "SQuARE", "Q-Former", "projector", "LLM", "LLM decode", "[SEG] head",
              "SAM encoder", "SAM decoder")
IMAGE_DELIMITERS = 2   # <im_start>, <im_end> around each image's tokens


class LoopInProgram(ValueError):
  """XLA's cost analysis counts a while-loop body once: count it with :func:`loop_flops`."""


# --- XLA counts ---------------------------------------------------------------------------------


def _flops_of(lowered) -> float:
  analysis = lowered.cost_analysis()
  if isinstance(analysis, (list, tuple)):  # older jax: one dict per device program
    analysis = analysis[0]
  return float(analysis["flops"])


def xla_flops(fn: Callable[..., Any], *args) -> float:
  """XLA's FLOP count of ``jax.jit(fn)`` lowered at ``args`` (arrays or ShapeDtypeStructs).

  Raises:
    LoopInProgram: the program has a while loop, whose body XLA would count only once.
  """
  lowered = jax.jit(fn).lower(*args)
  if "stablehlo.while" in lowered.as_text():
    raise LoopInProgram("program contains a while loop (scan / fori_loop); XLA counts its body once. "
                        "Count the body with loop_flops(body, trip_count, ...) instead")
  return _flops_of(lowered)


def loop_flops(body: Callable[..., Any], trip_count: int, *args) -> float:
  """FLOPs of a loop running ``body(*args)`` ``trip_count`` times: the body lowered once, times the count."""
  return trip_count * xla_flops(body, *args)


def module_flops(module: nnx.Module, call: Callable[..., Any], *inputs) -> float:
  """XLA FLOPs of ``call(module, *inputs)``; ``module`` may be abstract (from ``nnx.eval_shape``)."""
  graphdef, state = nnx.split(module)

  def fn(state, *xs):
    return call(nnx.merge(graphdef, state), *xs)

  return xla_flops(fn, state, *inputs)


def _spec(shape, dtype) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(tuple(int(s) for s in shape), jnp.dtype(dtype))


# --- analytic counts ------------------------------------------------------------------------------


def mm(m: int, k: int, n: int) -> int:
  """A [m, k] @ [k, n] matmul: 2·m·k·n FLOPs."""
  return 2 * m * k * n


def attention(q: int, kv: int, width: int) -> int:
  """QKᵀ and PV over all heads (width = heads · head_dim): 2 · 2·q·kv·width."""
  return 2 * mm(q, width, kv)


def vit_block(tokens: int, width: int, mlp: int) -> int:
  """Pre-LN ViT block: qkv, attention, output projection, 2-layer MLP."""
  return (mm(tokens, width, 3 * width) + attention(tokens, tokens, width) + mm(tokens, width, width)
          + mm(tokens, width, mlp) + mm(tokens, mlp, width))


def patch_embed(image_size: int, patch: int, width: int) -> int:
  return mm((image_size // patch) ** 2, patch * patch * 3, width)


def eva_flops(cfg, images: int) -> int:
  tokens = 1 + (cfg.image_size // cfg.patch_size) ** 2
  return images * (patch_embed(cfg.image_size, cfg.patch_size, cfg.width)
                   + cfg.depth * vit_block(tokens, cfg.width, cfg.mlp_dim))


def clip_flops(cfg, images: int) -> int:
  """All ``depth`` blocks run (LLaVA calls the tower with output_hidden_states and picks layer -2)."""
  tokens = 1 + clip_vit.num_patches(cfg)
  return images * (patch_embed(cfg.image_size, cfg.patch_size, cfg.width)
                   + cfg.depth * vit_block(tokens, cfg.width, cfg.mlp_dim))


def cross_attention(q: int, kv: int, width: int, kv_width: int) -> int:
  """q/o projections of the queries, k/v projections of kv_width features, attention."""
  return 2 * mm(q, width, width) + 2 * mm(kv, kv_width, width) + attention(q, kv, width)


def square_flops(model_cfg, images: int) -> int:
  s, q = model_cfg.square, model_cfg.qformer
  nq, d, features = q.num_query_tokens, q.hidden_size, images * (1 + (model_cfg.vision.image_size //
                                                                      model_cfg.vision.patch_size) ** 2)
  per_layer = (cross_attention(nq, features, d, model_cfg.vision.width) + mm(nq, d, s.mlp_dim)
               + mm(nq, s.mlp_dim, d))
  return s.depth * per_layer + mm(nq, d, d)  # + output projection


def qformer_flops(model_cfg, images: int, text: int) -> int:
  q = model_cfg.qformer
  nq, d, f = q.num_query_tokens, q.hidden_size, q.intermediate_size
  features = 1 + (model_cfg.vision.image_size // model_cfg.vision.patch_size) ** 2
  s = nq + text
  total = 0
  for i in range(q.num_layers):
    total += 4 * mm(s, d, d) + attention(s, s, d)
    if i % q.cross_attention_freq == 0:
      total += cross_attention(nq, features, d, q.encoder_width)
    total += mm(nq, d, f) + mm(nq, f, d) + mm(text, d, f) + mm(text, f, d)
  return images * total


def llm_flops(llm, lora, length: int, kv_length: int) -> int:
  """``length`` tokens through the decoder attending to ``kv_length`` keys, logits at every token."""
  d, h, kvh, f = llm.hidden_size, llm.num_heads, llm.num_kv_heads, llm.intermediate_size
  hd = llm.get("head_dim", None) or d // h
  per_layer = (mm(length, d, h * hd) + 2 * mm(length, d, kvh * hd) + mm(length, h * hd, d)
               + attention(length, kv_length, h * hd) + 3 * mm(length, d, f))
  if lora is not None and lora.enabled:
    outs = dict(q_proj=h * hd, k_proj=kvh * hd, v_proj=kvh * hd, o_proj=d, gate_proj=f, up_proj=f,
                down_proj=d)
    ins = dict(o_proj=h * hd, down_proj=f)
    for name in lora.targets:
      per_layer += mm(length, ins.get(name, d), lora.rank) + mm(length, lora.rank, outs[name])
  return llm.num_layers * per_layer + mm(length, d, llm.vocab_size)


def seg_head_flops(model_cfg, masks: int) -> int:
  d, h, c = model_cfg.llm.hidden_size, model_cfg.prima.seg_head_hidden, model_cfg.sam.prompt_embed_dim
  return mm(masks, d, h) + mm(masks, h, c)


def sam_encoder_flops(sam, images: int) -> int:
  """Windowed blocks run attention and its projections on the zero-padded window grid."""
  g, d = sam.image_size // sam.patch_size, sam.width
  t = g * g
  total = mm(t, sam.patch_size ** 2 * 3, d)
  for i in range(sam.depth):
    if i in tuple(sam.global_attn_indexes):
      tokens, attn, size = t, attention(t, t, d), g
    else:
      w = sam.window_size
      gp = -(-g // w) * w
      tokens, attn, size = gp * gp, (gp // w) ** 2 * attention(w * w, w * w, d), w
    total += mm(tokens, d, 3 * d) + attn + mm(tokens, d, d)
    if sam.use_rel_pos:
      total += 2 * mm(tokens, d, size)        # decomposed relative positions, h and w
    total += mm(t, d, sam.mlp_dim) + mm(t, sam.mlp_dim, d)
  c = sam.out_channels
  return images * (total + mm(t, d, c) + mm(t, 9 * c, c))


def sam_decoder_flops(sam, masks: int) -> int:
  """``masks`` decodes with one sparse token each; all K mask tokens are decoded, one is kept."""
  c, hw = sam.prompt_embed_dim, (sam.image_size // sam.patch_size) ** 2
  k = sam.num_multimask_outputs + 1
  tokens = 1 + k + 1
  inner = c // sam.attention_downsample_rate

  def attn(q, kv, i):
    return mm(q, c, i) + 2 * mm(kv, c, i) + attention(q, kv, i) + mm(q, i, c)

  per_layer = (attn(tokens, tokens, c) + attn(tokens, hw, inner) + mm(tokens, c, sam.decoder_mlp_dim)
               + mm(tokens, sam.decoder_mlp_dim, c) + attn(hw, tokens, inner))
  total = sam.decoder_depth * per_layer + attn(tokens, hw, inner)
  total += 2 * hw * 4 * c * (c // 4) + 2 * (4 * hw) * 4 * (c // 4) * (c // 8)   # two 2x2 transposed convs
  total += k * (2 * mm(1, c, c) + mm(1, c, c // 8))                             # hypernetwork MLPs
  total += 2 * k * (16 * hw) * (c // 8)                                          # masks = hyper · upscaled
  hid = sam.iou_head_hidden_dim
  total += mm(1, c, hid) + (sam.iou_head_depth - 2) * mm(1, hid, hid) + mm(1, hid, k)
  # The upscaling path's elementwise work is 6 % of the decoder: LayerNorm2d and exact GELU on the
  # [2h, 2w, C/4] map, exact GELU on the [4h, 4w, C/8] map, at XLA's per-element cost of each op.
  total += 4 * hw * (c // 4) * (elementwise_cost("layer_norm", c // 4) + elementwise_cost("gelu"))
  total += 16 * hw * (c // 8) * elementwise_cost("gelu")
  return masks * total + mm(hw, 2, c // 2)   # + the dense positional encoding, once per call


@functools.cache
def elementwise_cost(op: str, channels: int = 1) -> float:
  """XLA's FLOPs per element of ``op`` ('gelu': exact, erf-based; 'layer_norm' over ``channels``),
  probed once on a [1024, channels] float32 array (erf is a rational polynomial to XLA)."""
  x = _spec((1024, channels), jnp.float32)
  if op == "gelu":
    return xla_flops(layers.gelu, x) / (1024 * channels)
  if op == "layer_norm":
    norm = nnx.eval_shape(lambda: layers.layer_norm(channels, eps=1e-6, rngs=nnx.Rngs(0)))
    return module_flops(norm, lambda m, y: m(y), x) / (1024 * channels)
  raise ValueError(f"no elementwise probe for {op!r}")


# --- protocol and sequences -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Protocol:
  """What one example is (see the module docstring)."""
  images: int = 3
  prompt_tokens: int = 100
  answer_tokens: int = 64
  masks: int = 3
  generate: bool = False
  question_tokens: int = 32   # Q-Former instruction tokens

  def describe(self) -> str:
    mode = ("generation: prefill + KV-cache decode of the answer" if self.generate
            else "one teacher-forced forward over prompt + answer")
    return (f"{self.images} image(s)/example, prompt {self.prompt_tokens} text tokens (+{IMAGE_DELIMITERS} "
            f"delimiters per image), answer {self.answer_tokens} tokens, {self.masks} mask(s), "
            f"Q-Former text {self.question_tokens} tokens, batch 1; {mode}")


@dataclasses.dataclass(frozen=True)
class Model:
  """One row group of the table: a PRIMA or baseline config and how it sees multi-image examples."""
  name: str
  kind: str                  # "prima" | "lisa" | "glamm"
  cfg: ml_collections.ConfigDict
  mode: str = "joint"        # baselines: "joint" | "per_image"

  def image_tokens(self) -> int:
    if self.kind == "prima":
      return self.cfg.qformer.num_query_tokens
    return clip_vit.tokens_per_image(self.cfg.clip)


def passes(model: Model, p: Protocol) -> list[tuple[int, int]]:
  """The LLM passes of one example: (prefill length, answer tokens) each."""
  per_image = model.image_tokens() + IMAGE_DELIMITERS
  if model.kind == "prima" or model.mode == "joint":
    return [(p.prompt_tokens + p.images * per_image, p.answer_tokens)]
  if model.mode != "per_image":
    raise ValueError(f"multi-image mode must be one of {baselines.MULTI_IMAGE_MODES}, got {model.mode!r}")
  n = p.images
  return [(p.prompt_tokens + per_image, p.answer_tokens // n + (i < p.answer_tokens % n)) for i in range(n)]


# --- per-component counting -------------------------------------------------------------------


@dataclasses.dataclass
class Count:
  xla: float = 0.0
  analytic: float = 0.0

  def add(self, xla: float, analytic: float) -> None:
    self.xla += xla
    self.analytic += analytic

  @property
  def deviation(self) -> float:
    return 0.0 if self.analytic == 0 == self.xla else (self.xla - self.analytic) / max(self.analytic, 1.0)


def inference_config(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy for counting: parameters stored in the compute dtype, LoRA merged, no remat, unrolled
  layers (``scan_layers=False``: XLA counts a scan body once)."""
  cfg = ml_collections.ConfigDict(cfg.to_dict())
  cfg.param_dtype = cfg.dtype
  cfg.lora.enabled = False
  cfg.remat = False
  cfg.scan_layers = False
  return cfg


_ABSTRACT: dict[str, nnx.Module] = {}


def _constructors(model: Model) -> dict[str, tuple[Any, Callable[[], nnx.Module]]]:
  """name -> (the configs it depends on, constructor) of each component, with the arguments
  :class:`~prima_jax.models.prima.Prima` / :class:`~prima_jax.models.baselines.SegBaseline` use."""
  cfg = model.cfg
  kw = dict(dtype=layers.dtype_of(cfg.dtype), param_dtype=layers.dtype_of(cfg.param_dtype))
  attn = dict(attention_implementation=cfg.attention_implementation)
  rngs = lambda: nnx.Rngs(0)  # noqa: E731
  d = cfg.llm.hidden_size
  out = {
      "llm": ((cfg.llm, cfg.lora), lambda: Llama(cfg.llm, cfg.lora, rngs=rngs(), **attn, **kw)),
      "seg_head": ((d, cfg.prima.seg_head_hidden, cfg.sam.prompt_embed_dim),
                   lambda: SegHead(d, cfg.prima.seg_head_hidden, cfg.sam.prompt_embed_dim, rngs=rngs(),
                                   **kw)),
      "sam": (cfg.sam, lambda: Sam(cfg.sam, rngs=rngs(), **attn, **kw)),
  }
  if model.kind == "prima":
    q = cfg.qformer
    out.update(
        vision=(cfg.vision, lambda: EvaViT(cfg.vision, rngs=rngs(), **attn, **kw)),
        square=((cfg.square, q, cfg.vision.width), lambda: Square(
            cfg.square, num_queries=q.num_query_tokens, width=q.hidden_size, kv_width=cfg.vision.width,
            rngs=rngs(), **attn, **kw)),
        qformer=(q, lambda: QFormer(q, rngs=rngs(), **attn, **kw)),
        projector=((q.hidden_size, d),
                   lambda: layers.linear(q.hidden_size, d, ("embed", "embed"), rngs=rngs(), **kw)))
  else:
    c = cfg.clip
    out.update(
        vision=(c, lambda: clip_vit.ClipVisionTower(c, rngs=rngs(), **attn, **kw)),
        projector=((c.width, d, c.projector), lambda: clip_vit.ClipProjector(c.width, d, c.projector,
                                                                             rngs=rngs(), **kw)))
  return out


def _key(obj: Any) -> str:
  if isinstance(obj, ml_collections.ConfigDict):
    return obj.to_json()
  if isinstance(obj, tuple):
    return "(" + ",".join(_key(o) for o in obj) + ")"
  return repr(obj)


def abstract_component(model: Model, name: str) -> nnx.Module:
  """Component ``name`` of ``model`` with ShapeDtypeStruct parameters (nothing allocated); components
  with equal configs (the LLM, [SEG] head and SAM of all models) are built once."""
  deps, ctor = _constructors(model)[name]
  key = f"{model.kind if name in ('vision', 'projector', 'square', 'qformer') else ''}/{name}/" \
        f"{model.cfg.dtype}/{model.cfg.param_dtype}/{_key(deps)}"
  if key not in _ABSTRACT:
    _ABSTRACT[key] = nnx.eval_shape(ctor)
  return _ABSTRACT[key]


class Counter:
  """Lowers components and memoises their XLA counts by (component, configs, input shapes)."""

  def __init__(self):
    self.cache: dict[tuple, float] = {}

  def component(self, model: Model, name: str, call: Callable[..., Any], *inputs) -> float:
    """XLA FLOPs of ``call(component, *inputs)``."""
    m = abstract_component(model, name)
    key = (id(m), name, call.__code__, _key(tuple(jax.tree.map(lambda x: (x.shape, str(x.dtype)),
                                                                       inputs, is_leaf=_is_spec))))
    if key not in self.cache:
      self.cache[key] = module_flops(m, call, *inputs)
    return self.cache[key]

  def llm_step(self, model: Model, length: int, kv_length: int | None) -> float:
    """XLA FLOPs of ``length`` tokens; without cache (kv_length None) or with a cache of kv_length slots."""
    dtype = layers.dtype_of(model.cfg.dtype)
    x = _spec((1, length, model.cfg.llm.hidden_size), dtype)
    mask = _spec((1, length), jnp.bool_)
    if kv_length is None:
      return self.component(model, "llm", _llm_forward, x, mask)
    llm = abstract_component(model, "llm")
    cache = jax.eval_shape(lambda: llm.init_cache(1, kv_length, dtype))
    cache = dataclasses.replace(cache, index=_spec((), jnp.int32))
    return self.component(model, "llm", _llm_decode, x, mask, cache)


def _is_spec(x) -> bool:
  return isinstance(x, jax.ShapeDtypeStruct)


def _llm_forward(llm: Llama, x, mask):
  return llm(x, attention_mask=mask)[:2]


def _llm_decode(llm: Llama, x, mask, cache):
  return llm(x, attention_mask=mask, cache=cache)


def count_model(model: Model, p: Protocol, counter: Counter | None = None) -> dict[str, Count]:
  """Per-component XLA and analytic FLOPs of one example under ``p``."""
  counter = counter or Counter()
  cfg = model.cfg
  dtype = layers.dtype_of(cfg.dtype)
  n, masks = p.images, p.masks
  out = {c: Count() for c in COMPONENTS}
  if model.kind == "prima":
    v, q = cfg.vision, cfg.qformer
    feats = 1 + (v.image_size // v.patch_size) ** 2
    out["vision encoder"].add(
        counter.component(model, "vision", lambda m, x: m(x),
                          _spec((n, v.image_size, v.image_size, 3), dtype)),
        eva_flops(v, n))
    if cfg.square.enabled:
      out["SQuARE"].add(counter.component(model, "square", lambda m, f, valid: m(f, valid),
                                          _spec((1, n, feats, v.width), dtype), _spec((1, n), jnp.bool_)),
                        square_flops(cfg, n))
    out["Q-Former"].add(
        counter.component(model, "qformer", lambda m, qe, ids, tm, f: m(qe, ids, tm, f),
                          _spec((n, q.num_query_tokens, q.hidden_size), dtype),
                          _spec((n, p.question_tokens), jnp.int32), _spec((n, p.question_tokens), jnp.bool_),
                          _spec((n, feats, v.width), dtype)),
        qformer_flops(cfg, n, p.question_tokens))
    out["projector"].add(
        counter.component(model, "projector", lambda m, x: m(x),
                          _spec((1, n * q.num_query_tokens, q.hidden_size), dtype)),
        mm(n * q.num_query_tokens, q.hidden_size, cfg.llm.hidden_size))
  else:
    c = cfg.clip
    t = clip_vit.tokens_per_image(c)
    out["vision encoder"].add(
        counter.component(model, "vision", lambda m, x: m(x),
                          _spec((n, c.image_size, c.image_size, 3), dtype)),
        clip_flops(c, n))
    out["projector"].add(counter.component(model, "projector", lambda m, x: m(x),
                                           _spec((1, n * t, c.width), dtype)), projector_flops(c, n, cfg.llm))
  for prefill, answer in passes(model, p):
    if not p.generate:
      length = prefill + answer
      out["LLM"].add(counter.llm_step(model, length, None), llm_flops(cfg.llm, cfg.lora, length, length))
      continue
    out["LLM"].add(counter.llm_step(model, prefill, None), llm_flops(cfg.llm, cfg.lora, prefill, prefill))
    if answer:
      first, last = counter.llm_step(model, 1, prefill + 1), counter.llm_step(model, 1, prefill + answer)
      xla = answer * (first + last) / 2   # affine in the cache length: exact sum over the steps
      out["LLM decode"].add(xla, decode_flops(cfg.llm, cfg.lora, prefill, answer))
  s = cfg.sam
  g = s.image_size // s.patch_size
  out["[SEG] head"].add(counter.component(model, "seg_head", lambda m, x: m(x),
                                          _spec((1, masks, cfg.llm.hidden_size), dtype)),
                        seg_head_flops(cfg, masks))
  out["SAM encoder"].add(counter.component(model, "sam", lambda m, x: m.encode(x),
                                           _spec((n, s.image_size, s.image_size, 3), dtype)),
                         sam_encoder_flops(s, n))
  out["SAM decoder"].add(counter.component(model, "sam", lambda m, e, t: m.decode(e, t),
                                           _spec((masks, g, g, s.out_channels), dtype),
                                           _spec((masks, 1, s.prompt_embed_dim), dtype)),
                         sam_decoder_flops(s, masks))
  return out


def projector_flops(clip_cfg, images: int, llm) -> int:
  t = images * clip_vit.tokens_per_image(clip_cfg)
  out = mm(t, clip_cfg.width, llm.hidden_size)
  if clip_cfg.projector == "mlp2x_gelu":
    out += mm(t, llm.hidden_size, llm.hidden_size)
  return out


def decode_flops(llm, lora, prefill: int, answer: int) -> int:
  """``answer`` decode steps, step j attending to prefill + j cached tokens."""
  return sum(llm_flops(llm, lora, 1, prefill + j) for j in range(1, answer + 1))


def analytic_total(model: Model, p: Protocol) -> float:
  """The analytic count alone (no lowering): for sweeping protocols quickly."""
  cfg, n = model.cfg, p.images
  if model.kind == "prima":
    q = cfg.qformer
    total = (eva_flops(cfg.vision, n) + (square_flops(cfg, n) if cfg.square.enabled else 0)
             + qformer_flops(cfg, n, p.question_tokens)
             + mm(n * q.num_query_tokens, q.hidden_size, cfg.llm.hidden_size))
  else:
    total = clip_flops(cfg.clip, n) + projector_flops(cfg.clip, n, cfg.llm)
  for prefill, answer in passes(model, p):
    if p.generate:
      total += llm_flops(cfg.llm, cfg.lora, prefill, prefill)
      total += decode_flops(cfg.llm, cfg.lora, prefill, answer)
    else:
      total += llm_flops(cfg.llm, cfg.lora, prefill + answer, prefill + answer)
  return (total + seg_head_flops(cfg, p.masks) + sam_encoder_flops(cfg.sam, n)
          + sam_decoder_flops(cfg.sam, p.masks))


def models_for(model_cfg: ml_collections.ConfigDict, tiny: bool | None = None) -> list[Model]:
  """PRIMA and the four baseline variants (GLaMM/LISA x joint/per-image) around ``model_cfg``."""
  prima_cfg = inference_config(model_cfg)
  out = [Model("PRIMA", "prima", prima_cfg)]
  for style, label in (("glamm", "GLaMM"), ("lisa", "LISA")):
    cfg = baselines.baseline_config(style, prima_cfg, tiny=tiny)
    for mode in baselines.MULTI_IMAGE_MODES:
      out.append(Model(f"{label} {mode.replace('_', '-')}", style, cfg, mode))
  return out


# --- report ---------------------------------------------------------------------------------------


def _unit(largest: float) -> tuple[float, str]:
  for scale, name in ((1e12, "TFLOPs"), (1e9, "GFLOPs"), (1e6, "MFLOPs")):
    if largest >= scale:
      return scale, name
  return 1.0, "FLOPs"


def format_table(models: Sequence[Model], counts: Sequence[dict[str, Count]], p: Protocol) -> str:
  """The per-component TFLOPs table (XLA counts), totals, reductions and XLA-vs-analytic agreement."""
  lines = [f"protocol: {p.describe()}"]
  for m in models:
    lens = ", ".join(f"{a}+{b}" for a, b in passes(m, p))
    if m.kind == "prima":
      vis = f"EVA ViT-g {m.cfg.vision.image_size} px -> {m.image_tokens()} tokens/image"
    else:
      vis = (f"CLIP ViT-L/{m.cfg.clip.patch_size} {m.cfg.clip.image_size} px -> {m.image_tokens()} "
             f"tokens/image, {m.cfg.clip.projector} projector")
    lines.append(f"  {m.name:<17} {vis}; LLM pass(es) prefill+answer: {lens}")
  totals = [sum(c.xla for c in cnt.values()) for cnt in counts]
  scale, unit = _unit(max(totals))
  lines.append(f"dtype {models[0].cfg.dtype}; {unit} per example (2 FLOPs per multiply-add), "
               "XLA count of the lowered programs")
  width = 17
  lines.append(f"{'component':<14}" + "".join(f"{m.name:>{width}}" for m in models))
  used = [c for c in COMPONENTS if any(cnt[c].xla or cnt[c].analytic for cnt in counts)]
  for comp in used:
    lines.append(f"{comp:<14}" + "".join(f"{cnt[comp].xla / scale:>{width}.3f}" for cnt in counts))
  lines.append(f"{'total':<14}" + "".join(f"{t / scale:>{width}.3f}" for t in totals))
  prima = totals[0]
  lines.append(f"{'PRIMA saves':<14}" + "".join(
      f"{'':>{width}}" if i == 0 else f"{100 * (t - prima) / t:>{width - 1}.1f}%"
      for i, t in enumerate(totals)))
  lines.append(f"paper (v1): LISA {PAPER['lisa']}, GLaMM {PAPER['glamm']}, PRIMA {PAPER['prima']} TFLOPs; "
               f"PRIMA saves {100 * PAPER_REDUCTION:.1f}% vs GLaMM")
  lines.append("XLA vs analytic (matmuls + attention QK^T/PV; excludes norms, softmax, activations, biases, "
               "residuals, RoPE, masks, gathers):")
  worst = 0.0
  for m, cnt in zip(models, counts):
    parts = []
    for comp in used:
      c = cnt[comp]
      if c.analytic:
        parts.append(f"{comp} {100 * c.deviation:+.2f}%")
        worst = max(worst, abs(c.deviation))
    lines.append(f"  {m.name:<17} " + ", ".join(parts))
  verdict = "OK" if worst <= AGREEMENT_TOLERANCE else "FAIL"
  lines.append(f"  largest |deviation| {100 * worst:.2f}% "
               f"(tolerance {100 * AGREEMENT_TOLERANCE:.0f}%): {verdict}")
  return "\n".join(lines)


def sweep(models: Sequence[Model], base: Protocol, top: int = 8) -> str:
  """Analytic totals over a protocol grid: the protocols whose PRIMA-vs-GLaMM saving is nearest the
  paper's, and the one nearest its absolute TFLOPs."""
  prima = models[0]
  glamm = {m.mode: m for m in models if m.kind == "glamm"}
  lisa = {m.mode: m for m in models if m.kind == "lisa"}
  rows = []
  grid = itertools.product(range(1, 6), (0, 64, 128, 256, 512, 1024), (1, 3, 5), (False, True),
                           (100, 200, 400, 800), baselines.MULTI_IMAGE_MODES)
  max_positions = prima.cfg.llm.max_position_embeddings
  for images, answer, masks, generate, prompt, mode in grid:
    p = dataclasses.replace(base, images=images, answer_tokens=answer, masks=masks, generate=generate,
                            prompt_tokens=prompt)
    if max(a + b for a, b in passes(glamm[mode], p)) > max_positions:
      continue
    tp, tg, tl = analytic_total(prima, p), analytic_total(glamm[mode], p), analytic_total(lisa[mode], p)
    rows.append(((tg - tp) / tg, p, mode, tp, tg, tl))
  rows.sort(key=lambda r: abs(r[0] - PAPER_REDUCTION))
  lines = [f"sweep ({len(rows)} protocols, analytic counts): nearest to the paper's "
           f"{100 * PAPER_REDUCTION:.1f}% saving vs GLaMM",
           f"{'saving':>8} {'PRIMA':>8} {'GLaMM':>8} {'LISA':>8}  protocol (TFLOPs)"]
  for red, p, mode, tp, tg, tl in rows[:top]:
    lines.append(f"{100 * red:7.1f}% {tp / 1e12:8.2f} {tg / 1e12:8.2f} {tl / 1e12:8.2f}  baselines {mode}: "
                 f"{p.describe()}")
  by_abs = min(rows, key=lambda r: math.hypot(r[3] / 1e12 - PAPER["prima"], r[4] / 1e12 - PAPER["glamm"]))
  red, p, mode, tp, tg, tl = by_abs
  lines.append(f"nearest in absolute TFLOPs to (PRIMA {PAPER['prima']}, GLaMM {PAPER['glamm']}): "
               f"PRIMA {tp / 1e12:.2f}, GLaMM {tg / 1e12:.2f}, LISA {tl / 1e12:.2f}, "
               f"saving {100 * red:.1f}%; baselines {mode}: "
               f"{p.describe()}")
  return "\n".join(lines)


# --- training step (compiled) --------------------------------------------------------------------

# Variant -> the towers whose features the batch carries instead of their images (see
# prima_jax.training.aot.abstract_batch); no cached tower runs in the step.
TRAINING_VARIANTS: dict[str, tuple[str, ...]] = {"online": (), "sam_cached": ("sam",),
                                                 "sam_eva_cached": ("sam", "eva")}
_HLO_WHILE = re.compile(r"\swhile\(")


def _gib(b: float) -> float:
  return b / 2 ** 30


def training_config(config: ml_collections.ConfigDict, *, images: int, micro_batch: int | None = None,
                    mesh_shape: Sequence[int] | None = None):
  """(config, mesh, micro_batch): a copy of the training ``config`` whose step is ONE micro-batch.

  ``model.prima.max_images = images``; ``mesh_shape`` (data, fsdp, tensor) overrides ``config.mesh``;
  ``train.batch_size = micro_batch`` x the data-parallel shards (mesh data x fsdp) and
  ``train.grad_accum_steps = 1`` and ``model.scan_layers = False`` (no scan: XLA would count a scan
  body once). ``micro_batch``
  defaults to the recipe's micro-batch per shard, batch_size // grad_accum_steps // shards (>= 1).
  Everything else (dtypes, remat, frozen dtype, trainable set, LLM / question lengths) is kept.
  """
  from prima_jax.training.validate import build_mesh  # noqa: PLC0415

  config = copy.deepcopy(config)
  with config.unlocked():
    config.model.prima.max_images = int(images)
    config.model.scan_layers = False
    if mesh_shape is not None:
      data, fsdp, tensor = (int(x) for x in mesh_shape)
      config.mesh.update(data=data, fsdp=fsdp, tensor=tensor)
    mesh = build_mesh(config)
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    t = config.train
    if micro_batch is None:
      micro_batch = max(1, t.batch_size // t.grad_accum_steps // shards)
    if micro_batch < 1:
      raise ValueError(f"micro_batch must be >= 1, got {micro_batch}")
    t.batch_size, t.grad_accum_steps = int(micro_batch) * shards, 1
  return config, mesh, int(micro_batch)


def compiled_cost(compiled, *, devices: int, batch_size: int) -> dict[str, float]:
  """FLOPs per example and per-device memory of a compiled, sharded train step.

  ``cost_analysis()['flops']`` is the per-device program's count, so the step costs that x ``devices``
  and an example that / ``batch_size`` (the global batch).

  Raises:
    LoopInProgram: the optimized HLO has a while loop, whose body XLA counts once.
  """
  if _HLO_WHILE.search(compiled.as_text()):
    raise LoopInProgram("the compiled train step contains a while loop (scan / fori_loop); XLA counts "
                        "its body once, so its FLOPs would be undercounted")
  flops = _flops_of(compiled) * devices / batch_size
  m = compiled.memory_analysis()
  peak = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
  return dict(flops_per_example=flops, tflops_per_example=flops / 1e12, memory_gib_per_device=_gib(peak),
              temp_gib_per_device=_gib(m.temp_size_in_bytes),
              argument_gib_per_device=_gib(m.argument_size_in_bytes))


def training_costs(config: ml_collections.ConfigDict, *, images: int = Protocol.images,
                   micro_batch: int | None = None, mesh_shape: Sequence[int] | None = None,
                   variants: Sequence[str] = tuple(TRAINING_VARIANTS), log: Callable[[str], Any] | None = None
                   ) -> dict[str, dict[str, Any]]:
  """Compiled training-step cost of each of ``variants`` (keys of :data:`TRAINING_VARIANTS`).

  The train step of :func:`training_config`'s config (one micro-batch, forward + backward + optimizer
  update as XLA compiles it, remat included) on abstract state and batch (nothing allocated), via
  :func:`prima_jax.training.aot.compile_train_step`. Returns variant -> :func:`compiled_cost` plus
  ``compile_s``, ``examples_per_device`` (the micro-batch per data shard), ``global_batch``,
  ``devices``, ``images`` and ``llm_length``.
  """
  from prima_jax.data.features import tower_params  # noqa: PLC0415
  from prima_jax.models.prima import Prima  # noqa: PLC0415
  from prima_jax.training import aot  # noqa: PLC0415
  from prima_jax.training.partition import ModelParts  # noqa: PLC0415

  config, mesh, micro = training_config(config, images=images, micro_batch=micro_batch,
                                        mesh_shape=mesh_shape)
  unknown = [v for v in variants if v not in TRAINING_VARIANTS]
  if unknown:
    raise ValueError(f"unknown variant(s) {unknown}; choose from {list(TRAINING_VARIANTS)}")
  towers = sorted({t for v in variants for t in TRAINING_VARIANTS[v]})
  if towers:  # a trained tower's features change every step: caching it is no variant of this recipe
    abstract = nnx.eval_shape(lambda: Prima(config.model, rngs=layers.init_rngs(0)))
    frozen = nnx.to_pure_dict(ModelParts.split(abstract, config.train.trainable).frozen)
    for tower in towers:
      tower_params(frozen, tower)
  devices, batch = int(mesh.devices.size), int(config.train.batch_size)
  out = {}
  for name in variants:
    if log:
      log(f"compiling the {name} train step ({micro} example(s) per device, {devices} device(s))")
    compiled, seconds = aot.compile_train_step(config, mesh, TRAINING_VARIANTS[name])
    out[name] = dict(compiled_cost(compiled, devices=devices, batch_size=batch), compile_s=seconds,
                     examples_per_device=micro, global_batch=batch, devices=devices, images=int(images),
                     llm_length=int(config.data.max_length))
    del compiled
    if log:
      log(f"{name}: {out[name]['tflops_per_example']:.4g} TFLOPs/example, "
          f"{out[name]['memory_gib_per_device']:.2f} GiB/device, compiled in {seconds:.0f} s")
  return out


def describe_training(config: ml_collections.ConfigDict, costs: dict[str, dict[str, Any]],
                      mesh_shape: dict[str, int] | None = None) -> str:
  """The printed table of :func:`training_costs`."""
  first = next(iter(costs.values()))
  m, t = config.model, config.train
  recipe_micro = t.batch_size // t.grad_accum_steps
  lines = [
      "training step, compiled (forward + backward + optimizer update as XLA compiles it, remat "
      f"{'on' if m.remat else 'off'}); compute {m.dtype}, params {m.param_dtype}, frozen towers "
      f"{t.frozen_dtype or m.param_dtype}",
      f"{first['images']} image(s)/example, LLM length {first['llm_length']}, Q-Former text "
      f"{config.data.max_question_length} tokens, {m.prima.max_masks} mask slots; per micro-batch of "
      f"{first['examples_per_device']} examples per device (global {first['global_batch']} on "
      f"{first['devices']} x {jax.devices()[0].device_kind}"
      + (f", mesh {mesh_shape}" if mesh_shape else "") + f"); the recipe: global batch {t.batch_size} in "
      f"{t.grad_accum_steps} micro-batches of {recipe_micro}",
  ]
  scale, unit = _unit(max(c["flops_per_example"] for c in costs.values()))
  base = costs.get("online", {}).get("flops_per_example")
  lines.append(f"{'variant':<16}{unit + '/example':>18}{'vs online':>11}{'GiB/device':>12}{'temp GiB':>10}"
               f"{'compile s':>11}")
  for name, c in costs.items():
    ratio = f"{c['flops_per_example'] / base:.3f}" if base else "-"
    lines.append(f"{name:<16}{c['flops_per_example'] / scale:>18.3f}{ratio:>11}"
                 f"{c['memory_gib_per_device']:>12.2f}{c['temp_gib_per_device']:>10.2f}{c['compile_s']:>11.1f}")
  lines.append("FLOPs: XLA cost analysis of the compiled per-device program x devices / global batch; "
               "memory: arguments + outputs - aliased + temporaries (peak estimate)")
  return "\n".join(lines)


# --- CLI ------------------------------------------------------------------------------------------


def run(model_cfg: ml_collections.ConfigDict, p: Protocol, *, do_sweep: bool = False) -> str:
  """Counts every model under ``p`` and returns the printed report."""
  start = time.perf_counter()
  models = models_for(model_cfg)
  counter = Counter()
  counts = [count_model(m, p, counter) for m in models]
  report = format_table(models, counts, p)
  elapsed = time.perf_counter() - start
  report += f"\n(lowered {len(counter.cache)} programs in {elapsed:.1f} s, nothing compiled)"
  if do_sweep:
    report += "\n" + sweep(models, p)
  return report


def main(argv) -> None:
  del argv
  config = _CONFIG.value
  if _TRAINING.value:
    if _FAKE_DEVICES.value:
      jax.config.update("jax_platforms", "cpu")   # JAX read JAX_PLATFORMS at import, before aot set it
      if jax.device_count() != _FAKE_DEVICES.value:
        raise app.UsageError(f"--fake_devices={_FAKE_DEVICES.value}: JAX sees {jax.device_count()} devices")
    if "train" not in config:
      raise app.UsageError("--training needs a training config (with train, data, mesh): configs/m4seg.py")
    shape = tuple(int(x) for x in _MESH.value.split(",")) if _MESH.value else None
    costs = training_costs(config, images=_IMAGES.value, micro_batch=_MICRO_BATCH.value, mesh_shape=shape,
                           variants=_VARIANTS.value, log=logging.info)
    if _JSON.value:
      print(json.dumps(costs), flush=True)
    else:
      mesh = dict(zip(("data", "fsdp", "tensor"), shape)) if shape else dict(config.mesh)
      print(describe_training(config, costs, mesh), flush=True)
    return
  model_cfg = config.model if "model" in config else config
  question = _QUESTION.value
  if question is None:
    question = int(config.data.max_question_length) if "data" in config else Protocol.question_tokens
  p = Protocol(images=_IMAGES.value, prompt_tokens=_PROMPT.value, answer_tokens=_ANSWER.value,
               masks=_MASKS.value, generate=_GENERATE.value, question_tokens=question)
  print(run(model_cfg, p, do_sweep=_SWEEP.value), flush=True)


def _flag(define: Callable[..., flags.FlagHolder], name: str, *args, **kwargs) -> flags.FlagHolder:
  """``define(name, ...)``, or a holder of the flag when an imported module has defined it already."""
  if name in flags.FLAGS:
    return flags.FlagHolder(flags.FLAGS, flags.FLAGS[name])
  return define(name, *args, **kwargs)


if __name__ == "__main__":
  # Flags are defined only when run as a program, so that importing the module defines none.
  # prima_jax.training.aot (the --training compiler) defines --config, --mesh and --fake_devices on
  # import, and sets XLA_FLAGS for --fake_devices from sys.argv before any JAX backend starts (importing
  # jax does not start one); it is imported first and those flags are shared.
  from prima_jax.training import aot  # noqa: F401

  _CONFIG = _flag(config_flags.DEFINE_config_file, "config", None,
                  "Config file (path[:arg]); its `model` is PRIMA.")
  _IMAGES = flags.DEFINE_integer("images", Protocol.images, "Images per example.")
  _PROMPT = flags.DEFINE_integer("prompt_tokens", Protocol.prompt_tokens,
                                 "Text tokens of the prompt (image tokens and delimiters come on top).")
  _ANSWER = flags.DEFINE_integer("answer_tokens", Protocol.answer_tokens, "Answer tokens.")
  _MASKS = flags.DEFINE_integer("masks", Protocol.masks, "[SEG] masks per example.")
  _GENERATE = flags.DEFINE_bool("generate", False, "Count prefill + KV-cache decoding, not one forward.")
  _QUESTION = flags.DEFINE_integer("question_tokens", None,
                                   "Q-Former text tokens (default: the config's data.max_question_length).")
  _SWEEP = flags.DEFINE_bool("sweep", False, "Also sweep protocols (analytic) for the paper's saving.")
  _TRAINING = flags.DEFINE_bool("training", False,
                                "Compile the config's train step (one micro-batch) online, with cached SAM "
                                "embeddings, and with cached SAM + EVA features; print FLOPs/example and "
                                "memory/device.")
  _JSON = flags.DEFINE_bool("json", False, "--training: print one JSON object (logs go to stderr).")
  _MICRO_BATCH = flags.DEFINE_integer("micro_batch", None,
                                      "--training: examples per device (default: the recipe's micro-batch "
                                      "per data shard).")
  _MESH = _flag(flags.DEFINE_string, "mesh", None, "--training: data,fsdp,tensor (overrides config.mesh).")
  _VARIANTS = flags.DEFINE_list("variants", list(TRAINING_VARIANTS),
                                f"--training: which of {', '.join(TRAINING_VARIANTS)} to compile.")
  _FAKE_DEVICES = _flag(flags.DEFINE_integer, "fake_devices", 0,
                        "--training: pretend the CPU has this many devices.")
  flags.mark_flags_as_required(["config"])
  cli.run(main)
