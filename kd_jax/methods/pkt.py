"""`pkt`: probabilistic knowledge transfer (Passalis & Tefas, ECCV 2018) as mdistiller
codes it (distillers/PKT.py; RepDistiller's PKT is the same), on the pooled features:
f / (||f|| + 1e-7) (eps added, not a max), cosine similarities mapped to (S + 1) / 2,
rows normalised to sum 1, then mean over the B x B entries of
P_t log((P_t + 1e-7) / (P_s + 1e-7)); times weight. Defaults: engine/cfg.py
PKT.LOSS.FEAT_WEIGHT 30000, CE_WEIGHT 1.

The KL of nearly equal distributions cancels: float32 agrees with the original's float64
to ~1e-4 relative only (tests/data/methods/README.md, Numerics).
"""
import jax
import jax.numpy as jnp

from kd_jax import methods
from kd_jax.methods.common import wide

EPS = 1e-7


def _probabilities(f):
  # The original sets NaNs from a zero vector to 0; with the norm's gradient taken as 0
  # at a zero vector (as torch does for norm, not for its sqrt) there is none.
  squares = jnp.sum(jnp.square(f), axis=1, keepdims=True)
  norm = jnp.where(squares > 0, jnp.sqrt(jnp.where(squares > 0, squares, 1.0)), 0.0)
  f = f / (norm + EPS)
  similarity = (f @ f.T + 1.0) / 2.0
  return similarity / jnp.sum(similarity, axis=1, keepdims=True)


def pkt_loss(f_s, f_t):
  f_s, f_t = wide(f_s).reshape(f_s.shape[0], -1), wide(f_t).reshape(f_t.shape[0], -1)
  p_s, p_t = _probabilities(f_s), _probabilities(f_t)
  return jnp.mean(p_t * jnp.log((p_t + EPS) / (p_s + EPS)))


def _loss(cfg, student, teacher, batch, progress):
  del batch, progress
  return {'pkt': cfg.weight * pkt_loss(student['pooled'],
                                       jax.lax.stop_gradient(teacher['pooled']))}


PKT = methods.register(methods.Method(
    name='pkt', doc="Probabilistic knowledge transfer as mdistiller's PKT.py.",
    build=methods.pure(_loss), ce_weight=lambda cfg: cfg.ce_weight,
    fields={
        'weight': methods.Field(30000.0, 'loss weight (engine/cfg.py PKT.LOSS.FEAT_WEIGHT)',
                                methods.non_negative, 'a number >= 0'),
        'ce_weight': methods.Field(1.0, 'cross-entropy weight (PKT.LOSS.CE_WEIGHT)',
                                   methods.non_negative, 'a number >= 0'),
    }))
