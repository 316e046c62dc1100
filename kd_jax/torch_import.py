"""PyTorch state_dicts <-> kd_jax Flax variables, for every family of the zoo.

Each family names the PyTorch module of each of its Flax modules (`torch_module` in
its kd_jax.models module, on the unrolled layout); the leaves map by kind: conv kernels
HWIO <-> OIHW, dense kernels [in, out] <-> [out, in], BatchNorm scale/bias/mean/var <->
weight/bias/running_mean/running_var. `num_batches_tracked` is ignored on import and
written as 0 on export (the originals' `load_state_dict` expects it). A model that scans
its blocks gets them stacked on import and unstacked on export.
"""
from typing import Any, Mapping

import jax
import numpy as np
from flax import traverse_util

from kd_jax import models

_LEAVES = {('params', 'scale'): 'weight', ('params', 'bias'): 'bias',
           ('batch_stats', 'mean'): 'running_mean', ('batch_stats', 'var'): 'running_var'}


def _torch_entries(model, unrolled) -> dict:
  """{torch key: (flax flat key, flax shape)} for the unrolled variables' structure."""
  out = {}
  for key, leaf in traverse_util.flatten_dict(unrolled).items():
    collection, *path, name = key
    module = models.torch_module_name(model, path)
    if name == 'kernel':
      torch_leaf = 'weight'
    elif (collection, name) in _LEAVES:
      torch_leaf = _LEAVES[(collection, name)]
    else:
      torch_leaf = name
    out[f'{module}.{torch_leaf}'] = (key, tuple(leaf.shape))
  return out


def to_torch_layout(value):
  """A Flax kernel in PyTorch's layout: HWIO -> OIHW, [in, out] -> [out, in]."""
  if value.ndim == 4:
    return value.transpose(3, 2, 0, 1)
  return value.T if value.ndim == 2 else value


def to_flax_layout(value):
  """A PyTorch weight in Flax's layout: OIHW -> HWIO, [out, in] -> [in, out]."""
  if value.ndim == 4:
    return value.transpose(2, 3, 1, 0)
  return value.T if value.ndim == 2 else value


def _model_name(model) -> str:
  return getattr(model, 'name', None) or type(model).__name__


def torch_to_flax(state_dict: Mapping[str, Any], model, source: str = 'state_dict',
                  template: Mapping[str, Any] = None) -> dict:
  """Converts a PyTorch state_dict to Flax variables of `model`.

  `template` (default: the model's variable shapes) gives the layout, scanned or not.
  Every entry must match by name and shape, both ways; arrays keep the state_dict's
  dtype. Raises ValueError naming the first missing or unexpected key or the first
  shape that differs, and the family checked against.
  """
  if template is None:
    template = models.variable_shapes(model)
  unrolled = jax.eval_shape(models.unstack_blocks,
                            {k: template[k] for k in ('params', 'batch_stats')})
  entries = _torch_entries(model, unrolled)
  against = f'{type(model).__name__} ({type(model).__module__.rsplit(".", 1)[-1]} family)'
  for key in state_dict:
    if not isinstance(key, str):
      raise ValueError(f'{source} has a non-string key {key!r}')
  keys = [k for k in state_dict if not k.endswith('num_batches_tracked')]
  for key in keys:
    if key not in entries:
      raise ValueError(f'{source} does not fit {against}: unexpected key {key!r}')
  for key in entries:
    if key not in state_dict:
      raise ValueError(f'{source} does not fit {against}: missing key {key!r}')
  flat = {}
  for key, (flax_key, flax_shape) in entries.items():
    value = np.asarray(state_dict[key])
    torch_shape = to_torch_layout(np.empty(flax_shape, np.bool_)).shape
    if value.shape != torch_shape:
      raise ValueError(f'{source} does not fit {against}: {key!r} has shape '
                       f'{tuple(value.shape)}, expected {tuple(torch_shape)}')
    flat[flax_key] = to_flax_layout(value)
  return models.to_layout_of(traverse_util.unflatten_dict(flat), template)


def flax_to_torch(variables: Mapping[str, Any], model) -> dict:
  """The inverse of torch_to_flax: the PyTorch state_dict (numpy) of `model`."""
  variables = jax.tree.map(np.asarray, {k: variables[k] for k in ('params', 'batch_stats')})
  unrolled = models.unstack_blocks(variables)
  out = {}
  for key, (flax_key, _) in _torch_entries(model, unrolled).items():
    out[key] = to_torch_layout(traverse_util.flatten_dict(unrolled)[flax_key])
    if key.endswith('.running_var'):
      out[key[:-len('running_var')] + 'num_batches_tracked'] = np.zeros((), np.int64)
  return out


def read_pth(path: str) -> dict:
  """The state_dict (numpy) in a PyTorch checkpoint file, read with weights_only=True.

  Accepts what the originals save: {'model': state_dict, ...} (RepDistiller's and
  mdistiller's train_teacher.py), the reference's {'weight': state_dict}, or a bare
  state_dict; a 'module.' prefix (nn.DataParallel) is dropped.
  """
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ValueError(f'teacher file {path!r} is a PyTorch checkpoint; reading it needs '
                     'torch (pip install torch)') from None
  try:
    saved = torch.load(path, map_location='cpu', weights_only=True)
  except Exception as e:  # torch raises several types for unreadable files
    # torch's own message suggests weights_only=False, which would run the file's code.
    raise ValueError(f'cannot read teacher file {path!r}: it is corrupt, not a PyTorch '
                     f'checkpoint, or holds objects other than tensors ({type(e).__name__})'
                     ) from None
  state_dict = saved
  if isinstance(saved, dict):
    for wrapper in ('model', 'weight', 'state_dict'):
      if isinstance(saved.get(wrapper), dict):
        state_dict = saved[wrapper]
        break
  if not isinstance(state_dict, dict) or not state_dict or not all(
      isinstance(v, torch.Tensor) for v in state_dict.values()):
    raise ValueError(f"teacher file {path!r} holds no state_dict (expected {{'model': "
                     "state_dict}}, {'weight': state_dict} or a state_dict)")
  arrays = {}
  for k, v in state_dict.items():
    k = k[len('module.'):] if isinstance(k, str) and k.startswith('module.') else k
    v = v.detach().cpu()
    arrays[k] = v.numpy() if not v.is_floating_point() else v.float().numpy()
  return arrays


def load_pth(path: str, model, template: Mapping[str, Any] = None) -> dict:
  """Flax variables of `model` from a PyTorch checkpoint file (see read_pth)."""
  return torch_to_flax(read_pth(path), model, f'teacher file {path!r}', template)
