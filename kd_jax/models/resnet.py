"""CIFAR ResNets of basic blocks (depth 6n+2), three variants of one definition:
- `resnet_32_<depth>`: the seed reference's model as its code builds it: a 7x7 stem with
  padding 1 (32x32 images give 28/14/7 maps) and 1x1-conv projection shortcuts.
- `resnet<depth>` (8, 14, 20, ..., 110) and `resnet<depth>x4` (resnet8x4, resnet32x4):
  mdistiller's and RepDistiller's `resnet.py`: a 3x3 stem (32/16/8 maps), 1x1-conv + BN
  projection shortcuts where the shape changes; widths 16-16-32-64 (stem, stages), x4:
  32-64-128-256. resnet20 has 278,324 parameters.
- `resnet<depth>_a`: He et al. (2016)'s CIFAR ResNet: 3x3 stem, parameter-free shortcuts
  (stride-2 subsampling, zero channel padding, "option A"); ResNet-20 has 0.27M.

Features: 'stem', 'stage<i>' (after the stage's last ReLU), 'preact_stage<i>' (before
it, mdistiller's preact_feats), 'pooled'. Variables are named `conv1`, `bn1` (stem),
`layer{s}_{j}` (block j of stage s, PyTorch's `layer{s}.{j}`) and `fc`. By default
(`scan_blocks=True`) blocks 1..n-1 of a stage run as one `nn.scan` named
`layer{s}_blocks` (kd_jax.models.scan), so compile time does not grow with depth; a scan
of at most `unroll_blocks` (4) blocks is unrolled in the compiled program, with the same
variables (3-4% faster on a 2-core CPU for ResNet-20).
"""
import functools
import re
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from kd_jax.models.layers import conv_and_norm, torch_linear_bias_init
from kd_jax.models.scan import SCANNED_COLLECTIONS


class BasicBlock(nn.Module):
  """(relu(preact), preact), preact = shortcut(x) + bn2(conv2(relu(bn1(conv1(x)))))."""
  features: int
  strides: int
  conv: Callable[..., nn.Module]
  norm: Callable[..., nn.Module]
  projection_shortcut: bool

  @nn.compact
  def __call__(self, x):
    y = self.conv(self.features, (3, 3), self.strides, name='conv1')(x)
    y = nn.relu(self.norm(name='bn1')(y))
    y = self.conv(self.features, (3, 3), 1, name='conv2')(y)
    y = self.norm(name='bn2')(y)
    shortcut = x
    if x.shape != y.shape:
      if self.projection_shortcut:
        shortcut = self.conv(self.features, (1, 1), self.strides, padding=0,
                             name='downsample_conv')(x)
        shortcut = self.norm(name='downsample_bn')(shortcut)
      else:
        shortcut = x[:, ::self.strides, ::self.strides, :]
        extra = self.features - x.shape[-1]
        shortcut = jnp.pad(shortcut, ((0, 0),) * 3 + ((extra // 2, extra - extra // 2),))
    preact = shortcut + y
    return nn.relu(preact), preact


class CifarResNet(nn.Module):
  """A 3-stage CIFAR ResNet; `__call__` returns (logits, features).

  `dtype` is the compute dtype (e.g. jnp.bfloat16 on accelerators); parameters
  stay `param_dtype`. With dtype None the computation follows the variables' dtype,
  so float64 variables give a float64 forward pass.
  """
  stage_sizes: Sequence[int]
  num_classes: int
  stem_width: int
  stage_widths: Sequence[int]
  stem_kernel: int
  stem_padding: int
  projection_shortcut: bool
  dtype: Any = None
  param_dtype: Any = jnp.float32
  bn_momentum: float = 0.9
  axis_name: Optional[str] = None
  scan_blocks: bool = True
  unroll_blocks: int = 4

  @nn.compact
  def __call__(self, x, train: bool):
    conv, norm = conv_and_norm(self, train)
    if self.dtype is not None:
      x = x.astype(self.dtype)
    k, p = self.stem_kernel, self.stem_padding
    x = conv(self.stem_width, (k, k), 1, padding=p, name='conv1')(x)
    x = nn.relu(norm(name='bn1')(x))
    features = {'stem': x}
    for i, (num_blocks, width) in enumerate(zip(self.stage_sizes, self.stage_widths)):
      block = functools.partial(BasicBlock, width, conv=conv, norm=norm,
                                projection_shortcut=self.projection_shortcut)
      x, preact = block(2 if i > 0 else 1, name=f'layer{i + 1}_0')(x)
      if self.scan_blocks and num_blocks > 1:
        # The carry holds the last block's pre-activation too.
        blocks = nn.scan(lambda module, carry, _: (module(carry[0]), None),
                         variable_axes={c: 0 for c in SCANNED_COLLECTIONS},
                         split_rngs={'params': True}, length=num_blocks - 1,
                         unroll=num_blocks - 1 if num_blocks - 1 <= self.unroll_blocks else 1)
        (x, preact), _ = blocks(block(1, name=f'layer{i + 1}_blocks'), (x, preact), None)
      else:
        for j in range(1, num_blocks):
          x, preact = block(1, name=f'layer{i + 1}_{j}')(x)
      features[f'stage{i + 1}'] = x
      features[f'preact_stage{i + 1}'] = preact
    x = jnp.mean(x, axis=(1, 2))
    features['pooled'] = x
    logits = nn.Dense(self.num_classes, kernel_init=nn.initializers.xavier_uniform(),
                      bias_init=torch_linear_bias_init(x.shape[-1]), dtype=self.dtype,
                      param_dtype=self.param_dtype, name='fc')(x)
    return logits, features


_MODEL_NAME = re.compile(r'^(resnet_32_|resnet)(\d+)(x4|_a)?$')
# Top-level modules outside RepDistiller's get_feat_modules().
HEAD = ('fc',)
NAMES_HELP = ("'resnet<depth>' (mdistiller's: 8, 14, 20, 32, 44, 56, 110), 'resnet<depth>x4' "
              "(resnet8x4, resnet32x4), 'resnet<depth>_a' (He et al.'s option-A shortcuts) or "
              "'resnet_32_<depth>' (the seed reference's 7x7-stem model), depth 6n+2")


def build(name: str, num_classes: int, **kwargs) -> Optional[CifarResNet]:
  """The model called `name` (e.g. 'resnet_32_20', 'resnet56'), None if not this family's.

  kwargs go to CifarResNet (dtype, axis_name, bn_momentum, ...).
  """
  match = _MODEL_NAME.match(name)
  if not match or (match.group(1) == 'resnet_32_' and match.group(3)):
    return None
  depth = int(match.group(2))
  if depth < 8 or (depth - 2) % 6:
    raise ValueError(f'model {name!r}: depth {depth} is not 6n+2 with n >= 1 (8, 14, 20, 32, ...)')
  n = (depth - 2) // 6
  variant = dict(stem_kernel=3, stem_padding=1, projection_shortcut=True, stem_width=16,
                 stage_widths=(16, 32, 64))
  if match.group(1) == 'resnet_32_':
    variant.update(stem_kernel=7)
  elif match.group(3) == 'x4':
    variant.update(stem_width=32, stage_widths=(64, 128, 256))
  elif match.group(3) == '_a':
    variant.update(projection_shortcut=False)
  return CifarResNet(stage_sizes=(n, n, n), num_classes=num_classes, **variant, **kwargs)


_TORCH_SUBMODULES = {'downsample_conv': 'downsample.0', 'downsample_bn': 'downsample.1'}


def torch_module(path: tuple) -> str:
  """('layer2_0', 'downsample_bn') -> 'layer2.0.downsample.1'; ('fc',) -> 'fc'."""
  if len(path) == 1:
    return path[0]
  block, sub = path
  return block.replace('_', '.') + '.' + _TORCH_SUBMODULES.get(sub, sub)
