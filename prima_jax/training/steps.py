"""The jitted train and eval steps (explicit in/out shardings, donated train state).

Train state (a pytree of arrays, checkpointed as a whole)::

  {"step": int32 [], "params": trainable params (pure dict, float32 master copy),
   "opt_state": optax state of the trainable params only, "rng": uint32 [2] raw key data}

Frozen parameters are a separate, non-donated argument: no gradient is taken with respect to them
and they have no optimizer state. Dropout keys are re-derived from ``fold_in(rng, step)`` each step.

A step whose loss, gradient norm, updated parameters or updated optimizer state holds a NaN or inf is
not applied: it returns the incoming params and opt_state (``step`` still advances, the batch is used
up) and the metric ``finite`` = 0. The selection needs the updated trainable state and the incoming one
at once: one extra transient copy of the trainable parameters and their optimizer state.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from prima_jax.models.batch import IGNORE_LABEL, validate_batch
from prima_jax.models.configs import added_token_ids
from prima_jax.models.losses import frame_region, next_token_cross_entropy, prima_loss
from prima_jax.sharding import activation_sharding
from prima_jax.training.partition import ModelParts, replicated

PyTree = Any
BATCH_AXES = ("data", "fsdp")
LOSS_PARTS = ("loss", "ce", "bce", "dice")


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
  """Dim 0 over (data, fsdp), the rest replicated (as ``pipeline.to_global_batch`` lays it out)."""
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES, *([None] * (ndim - 1))))


def batch_shardings(mesh: Mesh, batch: Mapping[str, Any]) -> dict[str, NamedSharding]:
  return {k: batch_sharding(mesh, len(v.shape)) for k, v in batch.items()}


def opt_state_shardings(tx: optax.GradientTransformation, abstract_opt_state: PyTree, param_shardings: PyTree,
                        mesh: Mesh) -> PyTree:
  """Optimizer-state leaves that mirror parameters get their parameter's sharding; others are replicated."""
  return optax.tree_map_params(tx, lambda _, s: s, abstract_opt_state, param_shardings,
                               transform_non_params=lambda _: replicated(mesh))


def state_shardings(param_shardings: PyTree, opt_shardings: PyTree, mesh: Mesh) -> dict[str, Any]:
  rep = replicated(mesh)
  return {"step": rep, "params": param_shardings, "opt_state": opt_shardings, "rng": rep}


def _split_micro(batch: Mapping[str, jax.Array], accum: int, mesh: Mesh) -> dict[str, jax.Array]:
  """[B, ...] -> [accum, B / accum, ...]; micro-batch a takes rows a, a + accum, ... so every micro-batch
  is spread over all data shards."""
  def one(x):
    x = x.reshape(x.shape[0] // accum, accum, *x.shape[1:]).swapaxes(0, 1)
    spec = PartitionSpec(None, BATCH_AXES, *([None] * (x.ndim - 2)))
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
  return {k: one(v) for k, v in batch.items()}


def make_train_step(parts: ModelParts, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    loss_cfg: Any, *, grad_accum_steps: int, mesh: Mesh) -> Callable:
  """(state, frozen, batch) -> (state, metrics); not jitted (see :func:`jit_train_step`)."""

  def micro_loss(params, frozen, batch, key):
    model = parts.merge(params, frozen, parts.reseeded_rest(key), train=True)
    loss, aux = prima_loss(model(batch), batch, loss_cfg)
    aux = {k: aux[k].astype(jnp.float32) for k in aux}
    aux["tokens"] = batch["attention_mask"].sum().astype(jnp.float32)
    return loss, aux

  grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

  def train_step(state, frozen, batch):
    step = state["step"]
    key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), step)
    params = state["params"]
    if grad_accum_steps == 1:
      (_, aux), grads = grad_fn(params, frozen, batch, key)
    else:
      micro = _split_micro(batch, grad_accum_steps, mesh)

      def body(carry, xs):
        grads_sum, aux_sum = carry
        mb, i = xs
        (_, aux), grads = grad_fn(params, frozen, mb, jax.random.fold_in(key, i))
        return (jax.tree.map(jnp.add, grads_sum, grads), jax.tree.map(jnp.add, aux_sum, aux)), None

      zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
      aux0 = {k: jnp.zeros((), jnp.float32) for k in (*LOSS_PARTS, "num_tokens", "num_masks", "tokens")}
      (grads, aux), _ = jax.lax.scan(body, (zeros, aux0), (micro, jnp.arange(grad_accum_steps)))
      grads = jax.tree.map(lambda g: g / grad_accum_steps, grads)
      aux = {k: v / grad_accum_steps if k in LOSS_PARTS else v for k, v in aux.items()}
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
    grad_norm = optax.global_norm(grads)
    updates, opt_state = tx.update(grads, state["opt_state"], params)
    new_params = optax.apply_updates(params, updates)
    finite = all_finite((aux["loss"], grad_norm, new_params, opt_state))
    params, opt_state = jax.lax.cond(finite, lambda: (new_params, opt_state),
                                     lambda: (params, state["opt_state"]))
    metrics = dict(aux, grad_norm=grad_norm, param_norm=optax.global_norm(params),
                   lr=jnp.asarray(schedule(step), jnp.float32), finite=finite.astype(jnp.float32))
    return dict(step=step + 1, params=params, opt_state=opt_state, rng=state["rng"]), metrics

  return train_step


def all_finite(tree: PyTree) -> jax.Array:
  """bool []: no NaN or inf in any floating-point leaf.

  x * 0 is 0 for every finite x and NaN for inf / NaN, so one float sum per leaf (added up, as
  ``optax.global_norm`` does, and which cannot overflow) carries the answer. A per-leaf boolean
  ``isfinite(x).all()`` stacked over the tree made XLA's CPU compiler run for over 10 minutes on the
  sharded tiny train step.
  """
  sums = [jnp.sum(x.astype(jnp.float32) * 0) for x in jax.tree.leaves(tree)
          if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.isfinite(sum(sums)) if sums else jnp.asarray(True)


def jit_train_step(train_step: Callable, state_sh: PyTree, frozen_sh: PyTree, batch_sh: PyTree, mesh: Mesh):
  def traced(state, frozen, batch):
    with activation_sharding(mesh):
      return train_step(state, frozen, batch)
  return jax.jit(traced, in_shardings=(state_sh, frozen_sh, batch_sh),
                 out_shardings=(state_sh, replicated(mesh)), donate_argnums=(0,))


def eval_metrics(outputs: Mapping[str, jax.Array], batch: Mapping[str, jax.Array], loss_cfg: Any,
                 prima_cfg: Any) -> dict[str, jax.Array]:
  """Sums over one batch (teacher forced): loss parts (batch means), mask IoU terms, token accuracies.

  Mask IoU: prediction = mask logits > 0, both masks restricted to the valid region of the routed
  image in the SAM frame; an empty union counts as IoU 1. Token accuracy: argmax of the logits at t-1
  against the label at t over answer tokens (labels != -100); ``name_*``: the same over the tokens of
  grounded phrases (between ``<p>`` and ``</p>``: which object the answer names). ``object_*``: of the
  masks that share their image with another target of a different object (target IoU < 0.5), those
  whose prediction overlaps its own target more than every such other one (the mask is on the right
  object, not just on an object).
  """
  _, parts = prima_loss(outputs, batch, loss_cfg)
  frame = outputs["mask_logits"].shape[-1]
  image = batch["seg_image_index"]
  sizes = jnp.take_along_axis(batch["sam_sizes"], image[..., None], axis=1)
  region = frame_region(sizes, frame)
  pred = (outputs["mask_logits"] > 0) & region
  gt = (batch["gt_masks"] > 0.5) & region
  inter = (pred & gt).sum((-2, -1)).astype(jnp.float32)
  union = (pred | gt).sum((-2, -1)).astype(jnp.float32)
  valid = batch["seg_valid"].astype(jnp.float32)
  iou = jnp.where(union > 0, inter / jnp.maximum(union, 1.0), 1.0)

  # Every prediction against every target of its example: [b, m, m] IoUs.
  flat = lambda x: x.reshape(*x.shape[:2], -1).astype(jnp.float32)
  cross = lambda a, c: jnp.einsum("bjp,bkp->bjk", flat(a), flat(c))
  pred_area, gt_area = flat(pred).sum(-1), flat(gt).sum(-1)
  pred_gt = cross(pred, gt)
  pred_gt_iou = pred_gt / jnp.maximum(pred_area[:, :, None] + gt_area[:, None, :] - pred_gt, 1.0)
  gt_gt = cross(gt, gt)
  gt_gt_iou = gt_gt / jnp.maximum(gt_area[:, :, None] + gt_area[:, None, :] - gt_gt, 1.0)
  both_valid = batch["seg_valid"][:, :, None] & batch["seg_valid"][:, None, :]
  m = image.shape[1]
  rival = (both_valid & (image[:, :, None] == image[:, None, :]) & (gt_gt_iou < 0.5)
           & ~jnp.eye(m, dtype=bool)[None])
  contested = rival.any(-1) & batch["seg_valid"]
  own = jnp.diagonal(pred_gt_iou, axis1=1, axis2=2)
  best_rival = jnp.max(jnp.where(rival, pred_gt_iou, -1.0), axis=-1)
  right_object = contested & (own > best_rival)

  targets = batch["labels"][:, 1:]
  predicted = jnp.argmax(outputs["logits"][:, :-1], axis=-1)
  is_target = targets != IGNORE_LABEL
  correct = (predicted == targets) & is_target
  ids = added_token_ids(prima_cfg)
  opened = jnp.cumsum(targets == ids["<p>"], axis=-1) - jnp.cumsum(targets == ids["</p>"], axis=-1)
  in_name = is_target & (opened > 0) & (targets != ids["<p>"])
  out = {k: parts[k].astype(jnp.float32) for k in LOSS_PARTS}
  f32 = lambda x: x.sum().astype(jnp.float32)
  out.update(
      batches=jnp.ones((), jnp.float32),
      iou_sum=(iou * valid).sum(), masks=valid.sum(),
      intersection=(inter * valid).sum(), union=(union * valid).sum(),
      correct_tokens=f32(correct), target_tokens=f32(is_target),
      name_correct=f32(correct & in_name), name_tokens=f32(in_name),
      object_right=f32(right_object), object_contested=f32(contested),
  )
  return out


def make_eval_step(parts: ModelParts, loss_cfg: Any, prima_cfg: Any, *,
                   other_images: bool = False) -> Callable:
  """(params, frozen, batch) -> sums of :func:`eval_metrics`; ``prima_cfg``: the model's ``prima``.

  ``other_images`` (``eval.other_images``): also the answer tokens' NLL when every example's image slots
  get the images of the previous example in the batch (its EVA features rolled along the batch, read
  with its own question), against the NLL with its own: ``other_images_nll_sum`` and
  ``own_images_nll_sum``. How much the answers depend on what the images show, as opposed to the
  question and the answer's own text; one more Q-Former and LLM forward per batch (EVA runs once).
  """

  def eval_step(params, frozen, batch):
    model = parts.merge(params, frozen, train=False)
    if not other_images:
      return eval_metrics(model(batch), batch, loss_cfg, prima_cfg)
    validate_batch(batch, model.cfg)
    features = model.batch_eva_features(batch)
    own = model.embed_prompt(batch["input_ids"], model.batch_image_tokens(batch, features))
    out = eval_metrics(model.answer_and_masks(own, batch), batch, loss_cfg, prima_cfg)
    other = model.embed_prompt(batch["input_ids"],
                               model.batch_image_tokens(batch, jnp.roll(features, 1, axis=0)))
    logits, _, _ = model.llm(other, attention_mask=batch["attention_mask"].astype(bool))
    other_ce, _ = next_token_cross_entropy(logits, batch["labels"])
    # eval_metrics' ce is the mean over the same answer tokens it counts in target_tokens.
    out.update(own_images_nll_sum=out["ce"] * out["target_tokens"],
               other_images_nll_sum=other_ce * out["target_tokens"])
    return out

  return eval_step


def jit_eval_step(eval_step: Callable, param_sh: PyTree, frozen_sh: PyTree, batch_sh: PyTree, mesh: Mesh):
  def traced(params, frozen, batch):
    with activation_sharding(mesh):
      return eval_step(params, frozen, batch)
  return jax.jit(traced, in_shardings=(param_sh, frozen_sh, batch_sh), out_shardings=replicated(mesh))


def summarize_eval(totals: Mapping[str, float]) -> dict[str, float]:
  """Accumulated :func:`eval_metrics` sums -> final metrics (means, mIoU, cIoU, accuracies)."""
  n = max(totals.get("batches", 0.0), 1.0)
  out = {k: totals[k] / n for k in LOSS_PARTS if k in totals}
  out["miou"] = totals["iou_sum"] / max(totals["masks"], 1.0)
  out["ciou"] = totals["intersection"] / max(totals["union"], 1.0)
  out["token_accuracy"] = totals["correct_tokens"] / max(totals["target_tokens"], 1.0)
  out["name_accuracy"] = totals["name_correct"] / max(totals["name_tokens"], 1.0)
  # NaN when no mask shares its image with another object (nothing to tell apart).
  out["right_object"] = (totals["object_right"] / totals["object_contested"] if totals["object_contested"]
                         else float("nan"))
  if "other_images_nll_sum" in totals:
    # Nats per answer token the answers lose when each example sees another example's images.
    out["other_images_ce_gain"] = ((totals["other_images_nll_sum"] - totals["own_images_nll_sum"])
                                   / max(totals["target_tokens"], 1.0))
  out["masks"] = totals["masks"]
  out["batches"] = totals.get("batches", 0.0)
  return out


def make_predict_step(parts: ModelParts) -> Callable:
  """(params, frozen, batch) -> mask logits [b, m, S, S] (eval mode)."""

  def predict_step(params, frozen, batch):
    return parts.merge(params, frozen, train=False)(batch)["mask_logits"]

  return predict_step
