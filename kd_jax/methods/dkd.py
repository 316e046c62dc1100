"""`dkd`: Decoupled knowledge distillation (Zhao et al., CVPR 2022) as mdistiller codes
it (distillers/DKD.py): min(epoch / warmup, 1) * (alpha * TCKD + beta * NCKD), both terms
times T^2 / batch, with mdistiller's 1-based epoch, so the first epoch already has 1/20 of
the weight. Defaults: engine/cfg.py (alpha 1, beta 8, T 4, warm-up 20, CE 1); mdistiller's
configs/cifar100/dkd/*.yaml set beta per pair (configs/cifar100_standard.py applies them).
NCKD masks the target class by subtracting 1000 from its logit / T, as the original does.
`logit_stand` as in `kd` (logit-standardization-KD's configs: alpha 9, beta 72, T 2).
"""
import jax
import jax.numpy as jnp

from kd_jax import methods
from kd_jax.methods.common import wide
from kd_jax.methods.kd import standardize


def _kl_sum(log_p_s, p_t):
  # torch's kl_div: target * (log target - input), 0 where target is 0.
  return jnp.sum(jnp.where(p_t > 0, p_t * (jnp.log(jnp.where(p_t > 0, p_t, 1.0)) - log_p_s), 0.0))


def dkd_terms(student_logits, teacher_logits, labels, temperature):
  """(TCKD, NCKD), each already times T^2 / batch."""
  s, t = wide(student_logits) / temperature, wide(teacher_logits) / temperature
  gt = jax.nn.one_hot(labels, s.shape[-1], dtype=bool)
  p_s, p_t = jax.nn.softmax(s), jax.nn.softmax(t)
  binary = lambda p: jnp.stack([jnp.sum(jnp.where(gt, p, 0), -1),
                                jnp.sum(jnp.where(gt, 0, p), -1)], -1)
  b_s, b_t = binary(p_s), binary(p_t)
  scale = temperature**2 / s.shape[0]
  tckd = _kl_sum(jnp.log(b_s), b_t) * scale
  nckd = _kl_sum(jax.nn.log_softmax(s - 1000.0 * gt), jax.nn.softmax(t - 1000.0 * gt)) * scale
  return tckd, nckd


def _loss(cfg, student, teacher, batch, progress):
  s, t = student['logits'], teacher['logits']
  alpha, beta, temperature = cfg.alpha, cfg.beta, cfg.temperature
  if cfg.logit_stand:
    s, t = standardize(s), standardize(t)
    alpha, beta, temperature = cfg.stand_alpha, cfg.stand_beta, cfg.stand_temperature
  tckd, nckd = dkd_terms(s, t, batch['label'], temperature)
  warmup = jnp.minimum(progress['epoch'].astype(jnp.float32) / cfg.warmup, 1.0)
  return {'dkd': warmup * (alpha * tckd + beta * nckd)}


DKD = methods.register(methods.Method(
    name='dkd', doc="Decoupled KD (Zhao et al., CVPR 2022) as mdistiller's DKD.py.",
    build=methods.pure(_loss), ce_weight=lambda cfg: cfg.ce_weight,
    fields={
        'alpha': methods.Field(1.0, 'TCKD weight (engine/cfg.py DKD.ALPHA)',
                               methods.non_negative, 'a number >= 0'),
        'beta': methods.Field(8.0, 'NCKD weight (engine/cfg.py DKD.BETA; the per-pair yaml '
                              'files set 1-8)', methods.non_negative, 'a number >= 0'),
        'temperature': methods.Field(4.0, 'T (engine/cfg.py DKD.T)', methods.positive,
                                     'a number > 0'),
        'warmup': methods.Field(20, 'epochs of linear warm-up (engine/cfg.py DKD.WARMUP)',
                                methods.positive, 'a number > 0'),
        'ce_weight': methods.Field(1.0, 'cross-entropy weight (engine/cfg.py DKD.CE_WEIGHT)',
                                   methods.non_negative, 'a number >= 0'),
        'logit_stand': methods.Field(False, 'standardise both logits first (Sun et al., CVPR '
                                     '2024)', lambda v: isinstance(v, bool), 'True or False'),
        'stand_alpha': methods.Field(9.0, 'alpha when logit_stand (logit-standardization-KD '
                                     'configs/cifar100/dkd)', methods.non_negative, 'a number >= 0'),
        'stand_beta': methods.Field(72.0, 'beta when logit_stand (same)', methods.non_negative,
                                    'a number >= 0'),
        'stand_temperature': methods.Field(2.0, 'T when logit_stand (same)', methods.positive,
                                           'a number > 0'),
    }))
