"""What the feature-based methods share: their stages, pooling, normalisation, initial
weights and the mapping of their connectors' PyTorch names to Flax variables.

The originals (mdistiller's distillers, RepDistiller's distiller_zoo) compare the
student's and teacher's `feats` of equal index, pool the spatially larger map to the
other's size with `adaptive_avg_pool2d`, normalise with `F.normalize` and build their
connectors with PyTorch's default initialisation; the helpers here do the same in NHWC.
"""
import re

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from kd_jax import torch_import
from kd_jax.methods.common import wide

# PyTorch's default Conv2d/ConvTranspose2d/Linear weight: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
torch_default_init = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')


def stage_keys(outputs):
  """'stage1', 'stage2', ... (mdistiller's feats[1:]) in order."""
  return sorted((k for k in outputs if re.fullmatch(r'stage\d+', k)), key=lambda k: int(k[5:]))


def stage_pairs(student, teacher):
  """(student key, teacher key) of equal index, as the originals zip feats[1:]."""
  return list(zip(stage_keys(student), stage_keys(teacher)))


def normalize(x, axis=-1, eps=1e-12):
  """F.normalize: x / max(||x||, eps), with torch's gradient (0 through the norm of a
  zero vector; sqrt's own gradient there would be NaN). Dead ReLU channels make such
  vectors in NST, RKD's angles and AT's maps."""
  squares = jnp.sum(jnp.square(x), axis=axis, keepdims=True)
  return x / jnp.sqrt(jnp.maximum(squares, eps * eps))


def pool_to(x, height, width):
  """adaptive_avg_pool2d of NHWC `x` to (height, width), for sizes that divide evenly
  (then it is a block mean; the CIFAR models' maps are 32/16/8/4)."""
  n, h, w, c = x.shape
  if (h, w) == (height, width):
    return x
  if h % height or w % width or h < height or w < width:
    raise ValueError(f'cannot pool {h}x{w} maps to {height}x{width}: the size must divide')
  return x.reshape(n, height, h // height, width, w // width, c).mean(axis=(2, 4))


def pool_larger(f_s, f_t):
  """Both maps at the smaller one's size: the map with more rows is pooled (mdistiller
  AT/NST/VID compare heights), whichever model it comes from."""
  f_s, f_t = wide(f_s), wide(f_t)
  if f_s.shape[1] > f_t.shape[1]:
    f_s = pool_to(f_s, *f_t.shape[1:3])
  elif f_s.shape[1] < f_t.shape[1]:
    f_t = pool_to(f_t, *f_s.shape[1:3])
  elif f_s.shape[2] != f_t.shape[2]:
    raise ValueError(f'maps of {f_s.shape[1]} rows differ in width: {f_s.shape} vs {f_t.shape}')
  return f_s, f_t


def check_pairs(ctx, keys, method):
  """The pairs of `keys` ([(student key, teacher key)]) exist in the context; else
  ValueError (the run is refused before anything trains)."""
  if not keys:
    raise ValueError(f'{method} needs stage features of both models')
  for s, t in keys:
    if s not in ctx.student or t not in ctx.teacher:
      raise ValueError(f'{method} needs student {s!r} and teacher {t!r}')


def flax_path(torch_key, ndim):
  """(collection, path) of a connector's PyTorch state_dict entry in these modules, or
  None for entries Flax does not keep (num_batches_tracked).

  The connectors name their submodules as the originals' attributes, a numeric index
  joined to the name before it ('regressors.0.2.weight' -> regressors_0_2/kernel);
  conv/linear 'weight' -> 'kernel', BatchNorm 'weight' -> 'scale', running statistics ->
  'batch_stats' mean/var; a bare parameter keeps its joined name ('log_scales.1' ->
  log_scales_1)."""
  parts = []
  for part in torch_key.split('.'):
    if part.isdigit() and parts:
      parts[-1] += '_' + part
    else:
      parts.append(part)
  *path, leaf = parts
  if leaf == 'num_batches_tracked':
    return None
  if leaf in ('running_mean', 'running_var'):
    return 'batch_stats', (*path, 'mean' if leaf == 'running_mean' else 'var')
  if leaf == 'weight':
    leaf = 'kernel' if ndim >= 2 else 'scale'
  return 'params', (*path, leaf)


def torch_connector_variables(state_dict):
  """{'params': ..., 'batch_stats': ...} of a method module from its connectors'
  PyTorch state_dict (keys as the original's distiller names them)."""
  variables = {}
  for key, value in state_dict.items():
    value = np.asarray(value)
    where = flax_path(key, value.ndim)
    if where is None:
      continue
    collection, path = where
    node = variables.setdefault(collection, {})
    for part in path[:-1]:
      node = node.setdefault(part, {})
    node[path[-1]] = torch_import.to_flax_layout(value)
  return variables
