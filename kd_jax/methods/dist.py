"""`dist`: DIST (Huang et al., NeurIPS 2022), "knowledge distillation from a stronger
teacher", as its authors code it (hunto/image_classification_sota,
lib/models/losses/dist_kd.py): with y = softmax(z / tau) for both models,

  inter = 1 - mean over examples of pearson(y_s[b, :], y_t[b, :])   (over classes)
  intra = 1 - mean over classes of pearson(y_s[:, c], y_t[:, c])    (over the batch)
  DIST  = tau^2 (beta inter + gamma intra),   loss = weight * DIST,

pearson(a, b) = <a - mean a, b - mean b> / (|a - mean a| |b - mean b| + 1e-8). CIFAR-100
defaults of that repository (kd_loss.py `dist_t4`, configs dist_cifar.yaml): tau 4,
beta = gamma = 1, KD weight 2, CE weight 1. `logit_stand=True` standardises both logits
first as logit-standardization-KD does for KD (kd_jax's composition: no original
combines the two; DIST's own tau and weights are kept, tests/data/methods dist_ls).
"""
import jax
import jax.numpy as jnp

from kd_jax import methods
from kd_jax.methods.common import wide
from kd_jax.methods.kd import standardize


def _pearson_distance(a, b):
  """1 - mean over rows of the Pearson correlation of a's and b's rows."""
  a = a - jnp.mean(a, axis=1, keepdims=True)
  b = b - jnp.mean(b, axis=1, keepdims=True)
  norm = lambda x: jnp.sqrt(jnp.sum(jnp.square(x), axis=1))
  return 1.0 - jnp.mean(jnp.sum(a * b, axis=1) / (norm(a) * norm(b) + 1e-8))


def dist_terms(student_logits, teacher_logits, tau):
  """(tau^2 inter, tau^2 intra)."""
  y_s = jax.nn.softmax(wide(student_logits) / tau, axis=1)
  y_t = jax.nn.softmax(wide(teacher_logits) / tau, axis=1)
  return tau**2 * _pearson_distance(y_s, y_t), tau**2 * _pearson_distance(y_s.T, y_t.T)


def _loss(cfg, student, teacher, batch, progress):
  del batch, progress
  s, t = student['logits'], teacher['logits']
  if cfg.logit_stand:
    s, t = standardize(s), standardize(t)
  inter, intra = dist_terms(s, t, cfg.tau)
  return {'dist': cfg.weight * (cfg.beta * inter + cfg.gamma * intra)}


DIST = methods.register(methods.Method(
    name='dist', doc="DIST (Huang et al., NeurIPS 2022) as its authors' dist_kd.py.",
    build=methods.pure(_loss), ce_weight=lambda cfg: cfg.ce_weight,
    fields={
        'tau': methods.Field(4.0, 'temperature (kd_loss.py dist_t4)', methods.positive,
                             'a number > 0'),
        'beta': methods.Field(1.0, 'inter-class weight', methods.non_negative, 'a number >= 0'),
        'gamma': methods.Field(1.0, 'intra-class weight', methods.non_negative, 'a number >= 0'),
        'weight': methods.Field(2.0, 'KD weight (dist_cifar.yaml kd_loss_weight)',
                                methods.non_negative, 'a number >= 0'),
        'ce_weight': methods.Field(1.0, 'cross-entropy weight (dist_cifar.yaml '
                                   'ori_loss_weight)', methods.non_negative, 'a number >= 0'),
        'logit_stand': methods.Field(False, 'standardise both logits first (Sun et al., CVPR '
                                     '2024)', lambda v: isinstance(v, bool), 'True or False'),
    }))
