"""`at`: attention transfer (Zagoruyko & Komodakis, ICLR 2017) as mdistiller codes it
(distillers/AT.py; RepDistiller's distiller_zoo/AT.py computes the same) and as the seed
reference (hankyul2/KnowledgeDistillation) does for equal shapes.

Per stage pair (student and teacher stage<i>, mdistiller's feats[1:] zipped), the map
with more rows is average-pooled to the other's size; a(f) = F.normalize of the channel
mean of f^p, flattened over space; the term is mean over batch and positions of
(a(f_s) - a(f_t))^2; the terms add over stages, times beta. Defaults: engine/cfg.py
AT.P 2, AT.LOSS.FEAT_WEIGHT 1000, CE_WEIGHT 1. The teacher's BatchNorm mode stays the
seed's ('batch'); mdistiller's teacher runs on running statistics
(`config.teacher.bn_mode='running'`, as configs/cifar100_standard.py sets).
"""
import jax
import jax.numpy as jnp

from kd_jax import methods
from kd_jax.methods import feature


def attention(f, p):
  """F.normalize(mean over channels of f^p), [B, H*W]."""
  power = f ** int(p) if float(p).is_integer() else f ** p
  return feature.normalize(jnp.mean(power, axis=-1).reshape(f.shape[0], -1))


def at_loss(f_s, f_t, p):
  """One stage's term: the larger map pooled, mean squared difference of the maps."""
  f_s, f_t = feature.pool_larger(f_s, f_t)
  return jnp.mean(jnp.square(attention(f_s, p) - attention(f_t, p)))


def _loss(cfg, student, teacher, batch, progress):
  del batch, progress
  total = sum(at_loss(student[s], jax.lax.stop_gradient(teacher[t]), cfg.p)
              for s, t in feature.stage_pairs(student, teacher))
  return {'at': cfg.beta * total}


AT = methods.register(methods.Method(
    name='at', doc="Attention transfer as mdistiller's AT.py (= RepDistiller's, the seed's).",
    build=methods.pure(_loss), ce_weight=lambda cfg: cfg.ce_weight, teacher_bn_mode='batch',
    fields={
        'beta': methods.Field(1000.0, 'weight of the summed stage terms (mdistiller '
                              'AT.LOSS.FEAT_WEIGHT; the seed reference: 1000)',
                              methods.non_negative, 'a number >= 0'),
        'p': methods.Field(2.0, 'power of the features in the attention map (AT.P)',
                           methods.positive, 'a number > 0'),
        'ce_weight': methods.Field(1.0, 'cross-entropy weight (AT.LOSS.CE_WEIGHT)',
                                   methods.non_negative, 'a number >= 0'),
    }))
