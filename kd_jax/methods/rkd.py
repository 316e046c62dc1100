"""`rkd`: relational KD (Park et al., CVPR 2019) as mdistiller codes it
(distillers/RKD.py; RepDistiller's RKDLoss is the same), on the pooled features.

Distance: pdist(e)_ij = sqrt(max(|e_i|^2 + |e_j|^2 - 2 e_i.e_j, eps)) with the diagonal
set to 0, divided by the mean of its positive entries; smooth-L1 (beta 1, mean over
B^2) between student and teacher. Angle: n_ij = F.normalize(e_j - e_i), angle_ijk =
n_ij . n_ik, smooth-L1 over all B^3. loss = weight * (distance_weight * distance +
angle_weight * angle). Defaults: engine/cfg.py RKD (25, 50, PDIST.EPSILON 1e-12,
SQUARED False, FEAT_WEIGHT 1, CE_WEIGHT 1).
"""
import jax
import jax.numpy as jnp

from kd_jax import methods
from kd_jax.methods import feature
from kd_jax.methods.common import wide


def pdist(e, squared, eps):
  squares = jnp.sum(jnp.square(e), axis=1)
  d = jnp.maximum(squares[:, None] + squares[None, :] - 2 * e @ e.T, eps)
  if not squared:
    d = jnp.sqrt(d)
  return jnp.where(jnp.eye(e.shape[0], dtype=bool), 0.0, d)


def _normalized_distances(e, squared, eps):
  d = pdist(e, squared, eps)
  positive = d > 0
  return d / (jnp.sum(jnp.where(positive, d, 0.0)) / jnp.sum(positive))


def _angles(e):
  # n[i, j] = e_j - e_i normalised; the diagonal's zero vectors stay 0 with gradient 0
  # (smooth-L1's gradient at their zero difference is 0 too, as in torch).
  n = feature.normalize(e[None, :, :] - e[:, None, :], axis=2)
  return jnp.einsum('ijd,ikd->ijk', n, n)


def smooth_l1(a, b):
  x = jnp.abs(a - b)
  return jnp.mean(jnp.where(x < 1.0, 0.5 * x * x, x - 0.5))


def rkd_terms(f_s, f_t, squared=False, eps=1e-12):
  """(distance term, angle term), unweighted."""
  s, t = wide(f_s).reshape(f_s.shape[0], -1), wide(f_t).reshape(f_t.shape[0], -1)
  t = jax.lax.stop_gradient(t)
  distance = smooth_l1(_normalized_distances(s, squared, eps),
                       _normalized_distances(t, squared, eps))
  return distance, smooth_l1(_angles(s), _angles(t))


def _loss(cfg, student, teacher, batch, progress):
  del batch, progress
  distance, angle = rkd_terms(student['pooled'], teacher['pooled'], cfg.squared, cfg.eps)
  return {'rkd': cfg.weight * (cfg.distance_weight * distance + cfg.angle_weight * angle)}


RKD = methods.register(methods.Method(
    name='rkd', doc="Relational KD (distance and angle) as mdistiller's RKD.py.",
    build=methods.pure(_loss), ce_weight=lambda cfg: cfg.ce_weight,
    fields={
        'weight': methods.Field(1.0, 'loss weight (engine/cfg.py RKD.LOSS.FEAT_WEIGHT)',
                                methods.non_negative, 'a number >= 0'),
        'distance_weight': methods.Field(25.0, 'distance term weight (RKD.DISTANCE_WEIGHT)',
                                         methods.non_negative, 'a number >= 0'),
        'angle_weight': methods.Field(50.0, 'angle term weight (RKD.ANGLE_WEIGHT)',
                                      methods.non_negative, 'a number >= 0'),
        'eps': methods.Field(1e-12, 'lower clamp of the squared distances '
                             '(RKD.PDIST.EPSILON)', methods.positive, 'a number > 0'),
        'squared': methods.Field(False, 'squared distances (RKD.PDIST.SQUARED)',
                                 lambda v: isinstance(v, bool), 'True or False'),
        'ce_weight': methods.Field(1.0, 'cross-entropy weight (RKD.LOSS.CE_WEIGHT)',
                                   methods.non_negative, 'a number >= 0'),
    }))
