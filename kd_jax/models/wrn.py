"""Wide ResNets `wrn_<depth>_<width>` (depth 6n+4) as mdistiller's and RepDistiller's
`wrn.py` build them: pre-activation blocks (BN-ReLU-conv), a 1x1 shortcut convolution
where the width changes, and a final BN-ReLU before the pooling.

Features follow mdistiller's code, where this family differs from the others: 'stem' is
the first convolution's output (no BatchNorm or ReLU), 'stage<i>' the stage's output
before any normalisation (pre-activation blocks end in an addition), 'preact_stage<i>'
that output through the BatchNorm that the next stage (or the head) applies before its
ReLU. mdistiller computes those three features by calling the BatchNorms a second time,
so in train mode their running statistics are updated twice per step;
`preact_bn_twice=True` (the default) does the same, False updates them once.
mdistiller's dropout (`dropRate`, 0 in every config) is not offered.

Variables: `conv1`, `block{s}_{j}` (PyTorch `block{s}.layer.{j}`), `bn1`, `fc`; blocks
1..n-1 of a stage are scanned (`block{s}_blocks`).
"""
import functools
import re
from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp

from kd_jax.models.layers import conv_and_norm, torch_linear_bias_init
from kd_jax.models.scan import SCANNED_COLLECTIONS


class WideBlock(nn.Module):
  """(shortcut + conv2(relu(bn2(conv1(relu(bn1(x)))))), bn1(x))."""
  features: int
  strides: int
  conv: Any
  norm: Any
  bn1_twice: bool = False

  @nn.compact
  def __call__(self, x):
    bn1 = self.norm(name='bn1')
    pre = bn1(x)
    if self.bn1_twice:
      bn1(x)  # mdistiller's second call for its preact feature: statistics only
    a = nn.relu(pre)
    out = self.conv(self.features, (3, 3), self.strides, name='conv1')(a)
    out = nn.relu(self.norm(name='bn2')(out))
    out = self.conv(self.features, (3, 3), 1, name='conv2')(out)
    if x.shape[-1] == self.features:
      shortcut = x
    else:
      shortcut = self.conv(self.features, (1, 1), self.strides, padding=0,
                           name='convShortcut')(a)
    return shortcut + out, pre


class WideResNet(nn.Module):
  depth: int
  width: int
  num_classes: int
  dtype: Any = None
  param_dtype: Any = jnp.float32
  bn_momentum: float = 0.9
  axis_name: Optional[str] = None
  scan_blocks: bool = True
  unroll_blocks: int = 4
  preact_bn_twice: bool = True

  @nn.compact
  def __call__(self, x, train: bool):
    conv, norm = conv_and_norm(self, train)
    if self.dtype is not None:
      x = x.astype(self.dtype)
    n = (self.depth - 4) // 6
    widths = (16 * self.width, 32 * self.width, 64 * self.width)
    x = conv(16, (3, 3), 1, name='conv1')(x)
    features = {'stem': x}
    for i, width in enumerate(widths):
      block = functools.partial(WideBlock, width, conv=conv, norm=norm)
      # Block 0 of stages 2 and 3 normalises the previous stage's output: its bn1 gives
      # that stage's preact feature.
      x, pre = block(2 if i > 0 else 1, bn1_twice=i > 0 and self.preact_bn_twice,
                     name=f'block{i + 1}_0')(x)
      if i > 0:
        features[f'preact_stage{i}'] = pre
      if self.scan_blocks and n > 1:
        blocks = nn.scan(lambda module, x, _: (module(x)[0], None),
                         variable_axes={c: 0 for c in SCANNED_COLLECTIONS},
                         split_rngs={'params': True}, length=n - 1,
                         unroll=n - 1 if n - 1 <= self.unroll_blocks else 1)
        x, _ = blocks(block(1, name=f'block{i + 1}_blocks'), x, None)
      else:
        for j in range(1, n):
          x, _ = block(1, name=f'block{i + 1}_{j}')(x)
      features[f'stage{i + 1}'] = x
    bn1 = norm(name='bn1')
    pre = bn1(x)
    if self.preact_bn_twice:
      bn1(x)
    features['preact_stage3'] = pre
    x = jnp.mean(nn.relu(pre), axis=(1, 2))
    features['pooled'] = x
    logits = nn.Dense(self.num_classes, kernel_init=nn.initializers.xavier_uniform(),
                      bias_init=torch_linear_bias_init(x.shape[-1]), dtype=self.dtype,
                      param_dtype=self.param_dtype, name='fc')(x)
    return logits, features


_NAME = re.compile(r'^wrn_(\d+)_(\d+)$')
# Top-level modules outside RepDistiller's get_feat_modules() (its final BatchNorm too).
HEAD = ('bn1', 'fc')
NAMES_HELP = "'wrn_<depth>_<width>' (depth 6n+4, width >= 1: wrn_16_1, wrn_16_2, wrn_40_1, wrn_40_2)"


def build(name: str, num_classes: int, **kwargs) -> Optional[WideResNet]:
  match = _NAME.match(name)
  if not match:
    return None
  depth, width = int(match[1]), int(match[2])
  if depth < 10 or (depth - 4) % 6:
    raise ValueError(f'model {name!r}: depth {depth} is not 6n+4 with n >= 1 (10, 16, 22, 28, '
                     '40, ...)')
  if width < 1:
    raise ValueError(f'model {name!r}: width {width} is not an integer >= 1')
  return WideResNet(depth, width, num_classes, **kwargs)


def torch_module(path: tuple) -> str:
  """('block2_0', 'convShortcut') -> 'block2.layer.0.convShortcut'."""
  m = re.fullmatch(r'(block\d+)_(\d+)', path[0])
  head = f'{m[1]}.layer.{m[2]}' if m else path[0]
  return '.'.join((head, *path[1:]))
