"""The reference's PyTorch state_dict <-> kd_jax Flax variables.

Names map one to one: `conv1` / `bn1` (stem), `layer{s}.{j}.conv1|bn1|conv2|bn2`,
`layer{s}.{j}.downsample.0|1` (projection shortcut conv and BN), `fc`. Conv kernels
are OIHW in PyTorch and HWIO in Flax; linear weights are [out, in] in PyTorch and
[in, out] in Flax. `num_batches_tracked` has no Flax counterpart and is dropped.
The names are those of the unrolled layout (`layer{s}_{j}`); a model that scans its
blocks (`layer{s}_blocks`, see kd_jax.models) gets them stacked on import and
unstacked on export.
"""
import re
from typing import Any, Mapping

import jax
import numpy as np
from flax import traverse_util

from kd_jax import models

_BN_TORCH_TO_FLAX = {'weight': ('params', 'scale'), 'bias': ('params', 'bias'),
                     'running_mean': ('batch_stats', 'mean'),
                     'running_var': ('batch_stats', 'var')}
_BN_FLAX_TO_TORCH = {v: k for k, v in _BN_TORCH_TO_FLAX.items()}


def _module_path(torch_module: str) -> tuple:
  """'layer2.0.downsample.1' -> ('layer2_0', 'downsample_bn')."""
  m = re.fullmatch(r'(layer\d+)\.(\d+)\.(.+)', torch_module)
  if not m:
    return (torch_module,)
  sub = {'downsample.0': 'downsample_conv', 'downsample.1': 'downsample_bn'}.get(m[3], m[3])
  return (f'{m[1]}_{m[2]}', sub)


def _torch_module(path: tuple) -> str:
  if len(path) == 1:
    return path[0]
  block, sub = path
  sub = {'downsample_conv': 'downsample.0', 'downsample_bn': 'downsample.1'}.get(sub, sub)
  return block.replace('_', '.') + '.' + sub


def _is_conv(module_path: tuple) -> bool:
  return module_path[-1].startswith('conv') or module_path[-1] == 'downsample_conv'


def torch_to_flax(state_dict: Mapping[str, Any], template: Mapping[str, Any],
                  source: str = 'state_dict') -> dict:
  """Converts a reference state_dict to Flax variables shaped like `template`.

  `template` is the {'params', 'batch_stats'} of the target model (e.g. from
  models.init_variables), in either layout; every entry must be matched by name and
  shape, both ways. Arrays keep the state_dict's dtype. Raises ValueError naming what
  does not fit; `source` names the state_dict's origin in that message.
  """
  flat = {}
  for key, value in state_dict.items():
    if not isinstance(key, str):
      raise ValueError(f'{source} has a non-string key {key!r}')
    module, _, leaf = key.rpartition('.')
    if leaf == 'num_batches_tracked':
      continue
    value = np.asarray(value)
    path = _module_path(module)
    if path[-1].startswith('bn') or path[-1] == 'downsample_bn':
      collection, name = _BN_TORCH_TO_FLAX.get(leaf, ('params', leaf))
    elif path == ('fc',):
      collection, name = 'params', {'weight': 'kernel'}.get(leaf, leaf)
      value = value.T if leaf == 'weight' and value.ndim == 2 else value
    elif _is_conv(path) and leaf == 'weight':
      if value.ndim != 4:
        raise ValueError(f'{source} entry {key!r} has shape {value.shape}; a conv weight is 4-d')
      collection, name, value = 'params', 'kernel', value.transpose(2, 3, 1, 0)
    else:
      raise ValueError(f'{source} has an unexpected entry {key!r} for a CIFAR ResNet')
    flat[(collection, *path, name)] = value

  variables = traverse_util.unflatten_dict(flat)
  # Checked unrolled, where the names and shapes are the state_dict's own.
  unrolled = jax.eval_shape(models.unstack_blocks,
                            {k: template[k] for k in ('params', 'batch_stats')})
  models.check_variables(variables, unrolled, source)
  return models.to_layout_of(variables, template)


def flax_to_torch(variables: Mapping[str, Any]) -> dict:
  """The inverse of torch_to_flax: reference state_dict names and layouts (numpy)."""
  out = {}
  variables = jax.tree.map(np.asarray, {k: variables[k] for k in ('params', 'batch_stats')})
  for (collection, *path, name), value in traverse_util.flatten_dict(
      models.unstack_blocks(variables)).items():
    module = _torch_module(tuple(path))
    if (collection, name) in _BN_FLAX_TO_TORCH:
      leaf = _BN_FLAX_TO_TORCH[(collection, name)]
    elif name == 'kernel' and value.ndim == 4:
      leaf, value = 'weight', value.transpose(3, 2, 0, 1)
    elif name == 'kernel':
      leaf, value = 'weight', value.T
    else:
      leaf = name
    out[f'{module}.{leaf}'] = value
  return out


def load_pth(path: str, template: Mapping[str, Any]) -> dict:
  """Flax variables from a reference checkpoint file ({'weight': state_dict}).

  torch is needed only here; the file is read with weights_only=True, so it is
  never unpickled as code.
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
  state_dict = saved.get('weight', saved) if isinstance(saved, dict) else None
  if not isinstance(state_dict, dict) or not all(
      isinstance(v, torch.Tensor) for v in state_dict.values()):
    raise ValueError(f"teacher file {path!r} holds no state_dict (expected {{'weight': "
                     'state_dict}} or a state_dict)')
  arrays = {k: v.detach().cpu().float().numpy() for k, v in state_dict.items()}
  return torch_to_flax(arrays, template, f'teacher file {path!r}')
