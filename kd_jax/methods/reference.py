"""The seed reference's (hankyul2/KnowledgeDistillation @f019dfc) `fsp` form, registered by
kd_jax.methods.fsp (with RepDistiller's form beside it). (Its `at`, the same formula as
mdistiller's, is kd_jax/methods/at.py.)"""
import jax.numpy as jnp

from kd_jax.methods.common import mse, wide


def fsp_matrix(f_in, f_out):
  """G = F_in^T F_out / (h*w) per example; F_in average-pooled to F_out's size."""
  f_in, f_out = wide(f_in), wide(f_out)
  n, h, w, c = f_in.shape
  ho, wo = f_out.shape[1:3]
  if (h, w) != (ho, wo):
    f_in = f_in.reshape(n, ho, h // ho, wo, w // wo, c).mean(axis=(2, 4))
  return jnp.einsum('nhwi,nhwo->nio', f_in, f_out) / (ho * wo)


def stages(outputs):
  return sorted((k for k in outputs if k.startswith('stage')), key=lambda k: int(k[5:]))


def fsp_loss(cfg, student, teacher, batch, progress):
  """The seed's fsp term (kd_jax.methods.fsp's 'reference' form)."""
  del batch, progress
  names = ['stem', *stages(student)]
  pairs = list(zip(names[:-1], names[1:]))
  terms = [mse(fsp_matrix(student[a], student[b]), fsp_matrix(teacher[a], teacher[b]))
           for a, b in pairs]
  # The reference averages the pair losses and divides by 3 once more.
  return {'fsp': cfg.weight * sum(terms) / len(terms) / 3}
