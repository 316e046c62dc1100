"""MobileNetV2 for CIFAR as mdistiller's and RepDistiller's `mobilenetv2.py` build it;
`MobileNetV2` is their `mobile_half` (expansion 6, width 0.5), `mobilenetv2_<T>_<W>` any
expansion T and width W (e.g. mobilenetv2_6_1.0). A stride-2 3x3 stem, seven groups of
inverted residuals (1x1 expand, 3x3 depthwise with `feature_group_count`, 1x1 linear
projection; identity shortcut where stride 1 and widths equal), a 1x1 conv to 1280
channels, global average pooling. Maps: 16, 16, 8, 4, 4, 2, 2.

Features as mdistiller: 'stem' (after its ReLU), 'stage1'..'stage4' = the outputs of
groups 1, 2, 4 and 6 (linear bottlenecks: no ReLU after them, so this family has no
'preact_stage<i>'), 'pooled' [N, 1280]. Variables: `conv1_conv`/`conv1_bn` (PyTorch
`conv1.0`/`.1`), `blocks{b}_{j}` with `conv{k}`/`bn{k}` (`blocks.{b}.{j}.conv.{3k}` and
`.{3k+1}`), `conv2_conv`/`conv2_bn`, `classifier` (`classifier.0`).
"""
import re
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from kd_jax.models.layers import conv_and_norm, torch_linear_bias_init

# (expansion, channels, blocks, stride) of the seven groups; expansion 'T' is the model's.
SETTING = ((1, 16, 1, 1), ('T', 24, 2, 1), ('T', 32, 3, 2), ('T', 64, 4, 2), ('T', 96, 3, 1),
           ('T', 160, 3, 2), ('T', 320, 1, 1))
FEATURE_GROUPS = {1: 'stage1', 2: 'stage2', 4: 'stage3', 6: 'stage4'}


class InvertedResidual(nn.Module):
  out: int
  strides: int
  expansion: int
  conv: Any
  norm: Any

  @nn.compact
  def __call__(self, x):
    hidden = x.shape[-1] * self.expansion
    y = nn.relu(self.norm(name='bn0')(self.conv(hidden, (1, 1), 1, padding=0, name='conv0')(x)))
    y = self.conv(hidden, (3, 3), self.strides, feature_group_count=hidden, name='conv1')(y)
    y = nn.relu(self.norm(name='bn1')(y))
    y = self.norm(name='bn2')(self.conv(self.out, (1, 1), 1, padding=0, name='conv2')(y))
    return x + y if self.strides == 1 and x.shape[-1] == self.out else y


class MobileNetV2(nn.Module):
  expansion: int
  width: float
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
    x = conv(int(32 * self.width), (3, 3), 2, name='conv1_conv')(x)
    x = nn.relu(norm(name='conv1_bn')(x))
    features = {'stem': x}
    for b, (t, c, n, s) in enumerate(SETTING):
      for j in range(n):
        x = InvertedResidual(int(c * self.width), s if j == 0 else 1,
                             self.expansion if t == 'T' else t, conv, norm,
                             name=f'blocks{b}_{j}')(x)
      if b in FEATURE_GROUPS:
        features[FEATURE_GROUPS[b]] = x
    last = int(1280 * self.width) if self.width > 1.0 else 1280
    x = conv(last, (1, 1), 1, padding=0, name='conv2_conv')(x)
    x = nn.relu(norm(name='conv2_bn')(x))
    x = jnp.mean(x, axis=(1, 2))
    features['pooled'] = x
    logits = nn.Dense(self.num_classes, kernel_init=nn.initializers.normal(0.01),
                      bias_init=torch_linear_bias_init(x.shape[-1]), dtype=self.dtype,
                      param_dtype=self.param_dtype, name='classifier')(x)
    return logits, features


_NAME = re.compile(r'^(?:MobileNetV2|mobilenetv2_(\d+)_(\d+(?:\.\d+)?))$')
# Top-level modules outside RepDistiller's get_feat_modules() (its last 1x1 conv too).
HEAD = ('conv2_conv', 'conv2_bn', 'classifier')
NAMES_HELP = "'MobileNetV2' (mobile_half: expansion 6, width 0.5) or 'mobilenetv2_<T>_<W>'"


def build(name: str, num_classes: int, **kwargs) -> Optional[MobileNetV2]:
  match = _NAME.match(name)
  if not match:
    return None
  expansion, width = (int(match[1]), float(match[2])) if match[1] else (6, 0.5)
  if expansion < 1 or width <= 0:
    raise ValueError(f'model {name!r}: expansion {expansion} must be >= 1 and width {width} > 0')
  kwargs.pop('scan_blocks', None)  # the groups differ; nothing to scan
  return MobileNetV2(expansion, width, num_classes, **kwargs)


def torch_module(path: Sequence[str]) -> str:
  """('blocks2_1', 'conv1') -> 'blocks.2.1.conv.3'; ('conv1_bn',) -> 'conv1.1'."""
  head = path[0]
  m = re.fullmatch(r'(conv\d)_(conv|bn)', head)
  if m:
    return f'{m[1]}.{int(m[2] == "bn")}'
  if head == 'classifier':
    return 'classifier.0'
  m = re.fullmatch(r'blocks(\d+)_(\d+)', head)
  kind, k = re.fullmatch(r'(conv|bn)(\d)', path[1]).groups()
  return f'blocks.{m[1]}.{m[2]}.conv.{3 * int(k) + (kind == "bn")}'
