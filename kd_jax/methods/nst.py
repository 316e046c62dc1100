"""`nst`: neuron selectivity transfer (Huang & Wang, 2017) as mdistiller codes it
(distillers/NST.py; RepDistiller's NSTLoss is the same): per stage pair (feats[1:]), the
larger map pooled to the other's size, each channel L2-normalised over space, then the
squared-MMD with the polynomial kernel k(a, b) = (a . b)^2 between the two sets of
channels: mean K(t, t) + mean K(s, s) - 2 mean K(s, t); summed over stages, times weight.
Defaults: engine/cfg.py NST.LOSS.FEAT_WEIGHT 50, CE_WEIGHT 1.
"""
import jax
import jax.numpy as jnp

from kd_jax import methods
from kd_jax.methods import feature


def _kernel_mean(a, b):
  """mean over batch and channel pairs of (sum over space a_i b_j)^2; a, b [B, HW, C]."""
  return jnp.mean(jnp.square(jnp.einsum('bxi,bxj->bij', a, b)))


def nst_loss(f_s, f_t):
  f_s, f_t = feature.pool_larger(f_s, f_t)
  # Dead (all-zero) channels stay zero: normalize's gradient there is torch's (0).
  flat = lambda f: feature.normalize(f.reshape(f.shape[0], -1, f.shape[-1]), axis=1)
  s, t = flat(f_s), flat(f_t)
  return _kernel_mean(t, t) + _kernel_mean(s, s) - 2 * _kernel_mean(s, t)


def _loss(cfg, student, teacher, batch, progress):
  del batch, progress
  total = sum(nst_loss(student[s], jax.lax.stop_gradient(teacher[t]))
              for s, t in feature.stage_pairs(student, teacher))
  return {'nst': cfg.weight * total}


def _build(cfg, ctx):
  feature.check_pairs(ctx, feature.stage_pairs(ctx.student, ctx.teacher), 'nst')
  return methods.PureLoss(_loss, cfg)


NST = methods.register(methods.Method(
    name='nst', doc="Neuron selectivity transfer as mdistiller's NST.py.",
    build=_build, ce_weight=lambda cfg: cfg.ce_weight,
    fields={
        'weight': methods.Field(50.0, 'loss weight (engine/cfg.py NST.LOSS.FEAT_WEIGHT)',
                                methods.non_negative, 'a number >= 0'),
        'ce_weight': methods.Field(1.0, 'cross-entropy weight (NST.LOSS.CE_WEIGHT)',
                                   methods.non_negative, 'a number >= 0'),
    }))
