"""`sp`: similarity-preserving KD (Tung & Mori, ICCV 2019) as mdistiller codes it
(distillers/SP.py; RepDistiller's `Similarity` is the same): on the last stage (feats[-1]),
G = f f^T over the batch with f flattened per example, rows L2-normalised (F.normalize),
loss = sum (G_t - G_s)^2 / B^2, times weight. Defaults: engine/cfg.py SP.LOSS.FEAT_WEIGHT
3000, CE_WEIGHT 1. The loss compares the examples of a batch with each other: under pmap
each device's own batch is used, as mdistiller's DataParallel replicas do.
"""
import jax
import jax.numpy as jnp

from kd_jax import methods
from kd_jax.methods import feature
from kd_jax.methods.common import wide


def similarity(f):
  """Row-normalised Gram matrix [B, B] of the flattened features."""
  f = wide(f).reshape(f.shape[0], -1)
  return feature.normalize(f @ f.T)


def sp_loss(f_s, f_t):
  diff = similarity(f_t) - similarity(f_s)
  return jnp.sum(jnp.square(diff)) / f_s.shape[0]**2


def _loss(cfg, student, teacher, batch, progress):
  del batch, progress
  s, t = feature.stage_keys(student)[-1], feature.stage_keys(teacher)[-1]
  return {'sp': cfg.weight * sp_loss(student[s], jax.lax.stop_gradient(teacher[t]))}


def _build(cfg, ctx):
  if not feature.stage_keys(ctx.student) or not feature.stage_keys(ctx.teacher):
    raise ValueError('sp needs stage features of both models')
  return methods.PureLoss(_loss, cfg)


SP = methods.register(methods.Method(
    name='sp', doc="Similarity-preserving KD as mdistiller's SP.py.",
    build=_build, ce_weight=lambda cfg: cfg.ce_weight,
    fields={
        'weight': methods.Field(3000.0, 'loss weight (engine/cfg.py SP.LOSS.FEAT_WEIGHT)',
                                methods.non_negative, 'a number >= 0'),
        'ce_weight': methods.Field(1.0, 'cross-entropy weight (SP.LOSS.CE_WEIGHT)',
                                   methods.non_negative, 'a number >= 0'),
    }))
