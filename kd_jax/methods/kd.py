"""`kd`: Hinton et al.'s knowledge distillation as mdistiller codes it (distillers/KD.py):
CE_WEIGHT * CE + KD_WEIGHT * T^2 * KL(softmax(t/T) || softmax(s/T)), with the CIFAR-100
defaults of mdistiller's engine/cfg.py and configs/cifar100/kd.yaml: CE 0.1, KD 0.9,
T 4. (The seed reference's weighting, CE + T^2 KL, is the method `st`.)

`logit_stand=True` is Sun et al.'s logit standardisation (CVPR 2024,
sunshangquan/logit-standardization-KD, distillers/KD.py): both models' logits become
(z - mean) / (1e-7 + std), std with Bessel's correction as torch.std computes it, before
the temperature; that repository's CIFAR-100 configs then use T 2 and KD weight 9
(`stand_temperature`, `stand_weight`).
"""
import jax
import jax.numpy as jnp

from kd_jax import methods
from kd_jax.methods.common import wide


def standardize(logits):
  """(z - mean) / (1e-7 + std) over classes, std unbiased (torch.std)."""
  logits = wide(logits)
  mean = jnp.mean(logits, axis=-1, keepdims=True)
  std = jnp.std(logits, axis=-1, keepdims=True, ddof=1)
  return (logits - mean) / (1e-7 + std)


def kd_loss(student_logits, teacher_logits, temperature):
  """T^2 * sum over classes of KL(teacher || student), mean over the batch."""
  log_p_s = jax.nn.log_softmax(wide(student_logits) / temperature)
  log_p_t = jax.nn.log_softmax(wide(teacher_logits) / temperature)
  return temperature**2 * jnp.mean(jnp.sum(jnp.exp(log_p_t) * (log_p_t - log_p_s), axis=-1))


def logit_pair(cfg, student, teacher):
  """(student logits, teacher logits, temperature, weight) after the logit_stand option."""
  s, t = student['logits'], teacher['logits']
  if cfg.logit_stand:
    return standardize(s), standardize(t), cfg.stand_temperature, cfg.stand_weight
  return wide(s), wide(t), cfg.temperature, cfg.weight


def stand_fields(temperature, weight, source):
  """The logit-standardisation fields shared by kd, dkd and dist."""
  return {
      'logit_stand': methods.Field(False, 'standardise both logits first (Sun et al., CVPR '
                                   '2024)', lambda v: isinstance(v, bool), 'True or False'),
      'stand_temperature': methods.Field(temperature, 'temperature used when logit_stand '
                                         f'({source})', methods.positive, 'a number > 0'),
      'stand_weight': methods.Field(weight, f'loss weight used when logit_stand ({source})',
                                    methods.non_negative, 'a number >= 0'),
  }


def _loss(cfg, student, teacher, batch, progress):
  del batch, progress
  s, t, temperature, weight = logit_pair(cfg, student, teacher)
  return {'kd': weight * kd_loss(s, t, temperature)}


KD = methods.register(methods.Method(
    name='kd', doc="Knowledge distillation (Hinton et al.) as mdistiller's KD.py.",
    build=methods.pure(_loss), ce_weight=lambda cfg: cfg.ce_weight,
    fields={
        'temperature': methods.Field(4.0, 'T (mdistiller engine/cfg.py KD.TEMPERATURE)',
                                     methods.positive, 'a number > 0'),
        'weight': methods.Field(0.9, 'KD weight (cfg.py KD.LOSS.KD_WEIGHT)',
                                methods.non_negative, 'a number >= 0'),
        'ce_weight': methods.Field(0.1, 'cross-entropy weight (cfg.py KD.LOSS.CE_WEIGHT)',
                                   methods.non_negative, 'a number >= 0'),
        **stand_fields(2.0, 9.0, 'logit-standardization-KD configs/cifar100/kd/*.yaml'),
    }))
