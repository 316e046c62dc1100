"""The seed reference's (hankyul2/KnowledgeDistillation @f019dfc) `at` and `fsp` forms
(`fsp` is registered by kd_jax.methods.fsp, which also has RepDistiller's form)."""
import jax.numpy as jnp

from kd_jax import methods
from kd_jax.methods.common import mse, wide


def attention_map(features):
  """Per-example L2-normalised spatial map of the channel mean of squares."""
  a = jnp.mean(jnp.square(wide(features)), axis=-1).reshape(features.shape[0], -1)
  # F.normalize's eps: an all-zero map stays zero instead of becoming NaN.
  return a / jnp.maximum(jnp.linalg.norm(a, axis=-1, keepdims=True), 1e-12)


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


def _at_loss(cfg, student, teacher, batch, progress):
  del batch, progress
  total = sum(mse(attention_map(student[k]), attention_map(teacher[k])) for k in stages(student))
  return {'at': cfg.beta * total}


def fsp_loss(cfg, student, teacher, batch, progress):
  """The seed's fsp term (registered by kd_jax.methods.fsp as its 'reference' form)."""
  del batch, progress
  names = ['stem', *stages(student)]
  pairs = list(zip(names[:-1], names[1:]))
  terms = [mse(fsp_matrix(student[a], student[b]), fsp_matrix(teacher[a], teacher[b]))
           for a, b in pairs]
  # The reference averages the pair losses and divides by 3 once more.
  return {'fsp': cfg.weight * sum(terms) / len(terms) / 3}


AT = methods.register(methods.Method(
    name='at', doc='Attention transfer (Zagoruyko & Komodakis): beta * sum over stages of MSE.',
    build=methods.pure(_at_loss), teacher_bn_mode='batch',
    fields={'beta': methods.Field(1000.0, 'weight of the summed stage losses (the reference: '
                                  '1000)', methods.non_negative, 'a number >= 0')}))
