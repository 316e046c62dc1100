"""The ImageNet-style ResNets of mdistiller's and RepDistiller's `resnetv2.py` on CIFAR,
`ResNet18, ResNet34` (basic blocks) and `ResNet50, ResNet101, ResNet152` (bottlenecks):
a 3x3 stem of 64 channels without pooling, four stages of 64/128/256/512 planes (x4 for
bottlenecks), 1x1-conv + BN shortcuts where the shape changes, global average pooling.
ResNet50 is the teacher of two standard pairs (ResNet50 >> MobileNetV2, >> vgg8).

Features as mdistiller: 'stem' (after its ReLU), 'stage<i>' / 'preact_stage<i>' (i = 1..4,
the stage's output after / before its last ReLU), 'pooled'. Variables `conv1`, `bn1`,
`layer{s}_{j}` (PyTorch `layer{s}.{j}`; the shortcut's conv and BN are `shortcut_conv`
and `shortcut_bn`, PyTorch `shortcut.0` and `.1`) and `linear`. Blocks are not scanned:
on this CPU a scanned ResNet50 compiled slower (28-32 s) than an unrolled one (21-23 s).
"""
import re
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from kd_jax.models.layers import conv_and_norm, torch_linear_bias_init

DEPTHS = {18: ('basic', (2, 2, 2, 2)), 34: ('basic', (3, 4, 6, 3)),
          50: ('bottleneck', (3, 4, 6, 3)), 101: ('bottleneck', (3, 4, 23, 3)),
          152: ('bottleneck', (3, 8, 36, 3))}


class Block(nn.Module):
  """A basic block or a bottleneck; returns (relu(preact), preact)."""
  planes: int
  strides: int
  bottleneck: bool
  conv: Any
  norm: Any

  @nn.compact
  def __call__(self, x):
    expansion = 4 if self.bottleneck else 1
    if self.bottleneck:
      y = nn.relu(self.norm(name='bn1')(self.conv(self.planes, (1, 1), 1, padding=0,
                                                  name='conv1')(x)))
      y = nn.relu(self.norm(name='bn2')(self.conv(self.planes, (3, 3), self.strides,
                                                  name='conv2')(y)))
      y = self.norm(name='bn3')(self.conv(self.planes * 4, (1, 1), 1, padding=0,
                                          name='conv3')(y))
    else:
      y = nn.relu(self.norm(name='bn1')(self.conv(self.planes, (3, 3), self.strides,
                                                  name='conv1')(x)))
      y = self.norm(name='bn2')(self.conv(self.planes, (3, 3), 1, name='conv2')(y))
    shortcut = x
    if self.strides != 1 or x.shape[-1] != self.planes * expansion:
      shortcut = self.conv(self.planes * expansion, (1, 1), self.strides, padding=0,
                           name='shortcut_conv')(x)
      shortcut = self.norm(name='shortcut_bn')(shortcut)
    preact = y + shortcut
    return nn.relu(preact), preact


class ResNetV2(nn.Module):
  stage_sizes: Sequence[int]
  bottleneck: bool
  num_classes: int
  dtype: Any = None
  param_dtype: Any = jnp.float32
  bn_momentum: float = 0.9
  axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, x, train: bool):
    conv, norm = conv_and_norm(self, train)
    if self.dtype is not None:
      x = x.astype(self.dtype)
    x = nn.relu(norm(name='bn1')(conv(64, (3, 3), 1, name='conv1')(x)))
    features = {'stem': x}
    for i, (num_blocks, planes) in enumerate(zip(self.stage_sizes, (64, 128, 256, 512))):
      for j in range(num_blocks):
        x, preact = Block(planes, 2 if i > 0 and j == 0 else 1, self.bottleneck, conv, norm,
                          name=f'layer{i + 1}_{j}')(x)
      features[f'stage{i + 1}'] = x
      features[f'preact_stage{i + 1}'] = preact
    x = jnp.mean(x, axis=(1, 2))
    features['pooled'] = x
    logits = nn.Dense(self.num_classes, kernel_init=nn.initializers.xavier_uniform(),
                      bias_init=torch_linear_bias_init(x.shape[-1]), dtype=self.dtype,
                      param_dtype=self.param_dtype, name='linear')(x)
    return logits, features


_NAME = re.compile(r'^ResNet(\d+)$')
# Top-level modules outside RepDistiller's get_feat_modules().
HEAD = ('linear',)
NAMES_HELP = "'ResNet18', 'ResNet34', 'ResNet50', 'ResNet101' or 'ResNet152' (resnetv2)"


def build(name: str, num_classes: int, **kwargs) -> Optional[ResNetV2]:
  match = _NAME.match(name)
  if not match:
    return None
  depth = int(match[1])
  if depth not in DEPTHS:
    raise ValueError(f'model {name!r}: depth {depth} is not one of {sorted(DEPTHS)}')
  kwargs.pop('scan_blocks', None)  # unrolled, see the module's docstring
  kind, sizes = DEPTHS[depth]
  return ResNetV2(sizes, kind == 'bottleneck', num_classes, **kwargs)


_TORCH_SUBMODULES = {'shortcut_conv': 'shortcut.0', 'shortcut_bn': 'shortcut.1'}


def torch_module(path: Sequence[str]) -> str:
  """('layer2_0', 'shortcut_bn') -> 'layer2.0.shortcut.1'."""
  if len(path) == 1:
    return path[0]
  block, sub = path
  return block.replace('_', '.') + '.' + _TORCH_SUBMODULES.get(sub, sub)
