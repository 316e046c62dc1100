"""`st`: Hinton's soft targets as the reference codes them, CE + weight * T^2 * KL.

With `alpha` set, Hinton's weighting instead: (1 - alpha) * CE + alpha * T^2 * KL.
mdistiller's form (CE 0.1, KD 0.9) is the method `kd`.
"""
import jax
import jax.numpy as jnp

from kd_jax import methods
from kd_jax.methods.common import wide


def soft_target_kl(student_logits, teacher_logits, temperature):
  """T^2 * KL(softmax(t/T) || softmax(s/T)), summed over classes, mean over the batch."""
  log_p_s = jax.nn.log_softmax(wide(student_logits) / temperature)
  log_p_t = jax.nn.log_softmax(wide(teacher_logits) / temperature)
  kl = jnp.sum(jnp.exp(log_p_t) * (log_p_t - log_p_s), axis=-1)
  return temperature**2 * jnp.mean(kl)


def _loss(cfg, student, teacher, batch, progress):
  del batch, progress
  weight = cfg.alpha if cfg.alpha is not None else cfg.weight
  return {'st': weight * soft_target_kl(student['logits'], teacher['logits'], cfg.temperature)}


def _ce_weight(cfg):
  return 1.0 - cfg.alpha if cfg.alpha is not None else 1.0


ST = methods.register(methods.Method(
    name='st', doc="Soft targets (Hinton et al.) as the reference's code weighs them.",
    build=methods.pure(_loss), ce_weight=_ce_weight, teacher_bn_mode='batch',
    fields={
        'temperature': methods.Field(4.0, 'softmax temperature T (the reference: 4)',
                                     methods.positive, 'a number > 0'),
        'weight': methods.Field(1.0, 'weight of T^2 * KL when alpha is None (the reference: 1; '
                                'its at_st configs: 0.9)', methods.non_negative, 'a number >= 0'),
        'alpha': methods.Field(None, "Hinton's weighting: (1 - alpha) * CE + alpha * T^2 * KL; "
                               "None keeps the reference's CE + weight * T^2 * KL",
                               lambda v: v is None or (methods.non_negative(v) and v <= 1),
                               'None or a number in [0, 1]'),
    }))
