"""ShuffleNet V1 and V2 for CIFAR as mdistiller's and RepDistiller's `ShuffleNetv1.py`
and `ShuffleNetv2.py` build them: `ShuffleV1` (groups 3, stages of 240/480/960 channels,
4/8/4 blocks) and `ShuffleV2` (net size 1: 116/232/464 channels, 3/7/3 blocks, a 1x1 conv
to 1024); also `ShuffleV2_<size>` for their sizes 0.2, 0.3, 0.5, 1, 1.5, 2. Grouped and
depthwise convolutions use `feature_group_count`; channel shuffles and splits are
reshapes and slices in PyTorch's channel order. Both start with a 1x1 stem (no stride),
so maps are 32, 16, 8, 4.

Features as mdistiller: 'stem' (after its ReLU), 'stage<i>' (the stage's output; V2's
is shuffled), 'preact_stage<i>' (the last block's output before its ReLU; in V2 the
concatenation before the shuffle), 'pooled'. Variables: `conv1`, `bn1`, `layer{s}_{j}`
(PyTorch `layer{s}.{j}`), V2's `conv2`/`bn2`, `linear`. Blocks are not scanned.
"""
import re
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from kd_jax.models.layers import conv_and_norm, torch_linear_bias_init

V2_SIZES = {'0.2': ((40, 80, 160, 512), (3, 3, 3)), '0.3': ((40, 80, 160, 512), (3, 7, 3)),
            '0.5': ((48, 96, 192, 1024), (3, 7, 3)), '1': ((116, 232, 464, 1024), (3, 7, 3)),
            '1.5': ((176, 352, 704, 1024), (3, 7, 3)), '2': ((224, 488, 976, 2048), (3, 7, 3))}


def channel_shuffle(x, groups):
  """PyTorch's [N, g, C/g, H, W] -> [N, C/g, g, H, W] on NHWC."""
  n, h, w, c = x.shape
  return x.reshape(n, h, w, groups, c // groups).transpose(0, 1, 2, 4, 3).reshape(n, h, w, c)


class V1Bottleneck(nn.Module):
  out: int
  strides: int
  groups: int
  conv: Any
  norm: Any

  @nn.compact
  def __call__(self, x):
    mid = int(self.out / 4)
    g = 1 if x.shape[-1] == 24 else self.groups  # the stem's 24 channels: no groups
    y = self.conv(mid, (1, 1), 1, padding=0, feature_group_count=g, name='conv1')(x)
    y = channel_shuffle(nn.relu(self.norm(name='bn1')(y)), g)
    y = self.conv(mid, (3, 3), self.strides, feature_group_count=mid, name='conv2')(y)
    y = nn.relu(self.norm(name='bn2')(y))
    y = self.norm(name='bn3')(self.conv(self.out, (1, 1), 1, padding=0,
                                        feature_group_count=self.groups, name='conv3')(y))
    if self.strides == 2:
      # AvgPool2d(3, stride=2, padding=1) counts the zero padding (count_include_pad).
      shortcut = nn.avg_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)),
                             count_include_pad=True)
      preact = jnp.concatenate([y, shortcut], axis=-1)
    else:
      preact = y + x
    return nn.relu(preact), preact


class ShuffleV1(nn.Module):
  num_classes: int
  out_planes: Sequence[int] = (240, 480, 960)
  num_blocks: Sequence[int] = (4, 8, 4)
  groups: int = 3
  dtype: Any = None
  param_dtype: Any = jnp.float32
  bn_momentum: float = 0.9
  axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, x, train: bool):
    conv, norm = conv_and_norm(self, train)
    if self.dtype is not None:
      x = x.astype(self.dtype)
    x = nn.relu(norm(name='bn1')(conv(24, (1, 1), 1, padding=0, name='conv1')(x)))
    features = {'stem': x}
    for s, (out, n) in enumerate(zip(self.out_planes, self.num_blocks)):
      for j in range(n):
        block_out = out - x.shape[-1] if j == 0 else out  # block 0 concatenates its input
        x, preact = V1Bottleneck(block_out, 2 if j == 0 else 1, self.groups, conv, norm,
                                 name=f'layer{s + 1}_{j}')(x)
      features[f'stage{s + 1}'] = x
      features[f'preact_stage{s + 1}'] = preact
    x = jnp.mean(x, axis=(1, 2))
    features['pooled'] = x
    logits = nn.Dense(self.num_classes, kernel_init=nn.initializers.xavier_uniform(),
                      bias_init=torch_linear_bias_init(x.shape[-1]), dtype=self.dtype,
                      param_dtype=self.param_dtype, name='linear')(x)
    return logits, features


class V2Block(nn.Module):
  conv: Any
  norm: Any

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1] // 2
    x1, x2 = x[..., :c], x[..., c:]
    y = nn.relu(self.norm(name='bn1')(self.conv(c, (1, 1), 1, padding=0, name='conv1')(x2)))
    y = self.norm(name='bn2')(self.conv(c, (3, 3), 1, feature_group_count=c, name='conv2')(y))
    y = self.norm(name='bn3')(self.conv(c, (1, 1), 1, padding=0, name='conv3')(y))
    preact = jnp.concatenate([x1, y], axis=-1)
    return channel_shuffle(jnp.concatenate([x1, nn.relu(y)], axis=-1), 2), preact


class V2DownBlock(nn.Module):
  out: int
  conv: Any
  norm: Any

  @nn.compact
  def __call__(self, x):
    c_in, mid = x.shape[-1], self.out // 2
    a = self.norm(name='bn1')(self.conv(c_in, (3, 3), 2, feature_group_count=c_in,
                                        name='conv1')(x))
    a = nn.relu(self.norm(name='bn2')(self.conv(mid, (1, 1), 1, padding=0, name='conv2')(a)))
    b = nn.relu(self.norm(name='bn3')(self.conv(mid, (1, 1), 1, padding=0, name='conv3')(x)))
    b = self.norm(name='bn4')(self.conv(mid, (3, 3), 2, feature_group_count=mid,
                                        name='conv4')(b))
    b = nn.relu(self.norm(name='bn5')(self.conv(mid, (1, 1), 1, padding=0, name='conv5')(b)))
    return channel_shuffle(jnp.concatenate([a, b], axis=-1), 2)


class ShuffleV2(nn.Module):
  num_classes: int
  out_channels: Sequence[int] = V2_SIZES['1'][0]
  num_blocks: Sequence[int] = V2_SIZES['1'][1]
  dtype: Any = None
  param_dtype: Any = jnp.float32
  bn_momentum: float = 0.9
  axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, x, train: bool):
    conv, norm = conv_and_norm(self, train)
    if self.dtype is not None:
      x = x.astype(self.dtype)
    x = nn.relu(norm(name='bn1')(conv(24, (1, 1), 1, padding=0, name='conv1')(x)))
    features = {'stem': x}
    for s, (out, n) in enumerate(zip(self.out_channels[:3], self.num_blocks)):
      x = V2DownBlock(out, conv, norm, name=f'layer{s + 1}_0')(x)
      for j in range(1, n + 1):
        x, preact = V2Block(conv, norm, name=f'layer{s + 1}_{j}')(x)
      features[f'stage{s + 1}'] = x
      features[f'preact_stage{s + 1}'] = preact
    x = conv(self.out_channels[3], (1, 1), 1, padding=0, name='conv2')(x)
    x = jnp.mean(nn.relu(norm(name='bn2')(x)), axis=(1, 2))
    features['pooled'] = x
    logits = nn.Dense(self.num_classes, kernel_init=nn.initializers.xavier_uniform(),
                      bias_init=torch_linear_bias_init(x.shape[-1]), dtype=self.dtype,
                      param_dtype=self.param_dtype, name='linear')(x)
    return logits, features


_NAME = re.compile(r'^(ShuffleV1|ShuffleV2)(?:_(\d+(?:\.\d+)?))?$')
# Top-level modules outside RepDistiller's get_feat_modules() (ShuffleV2's last 1x1 conv too).
HEAD = ('conv2', 'bn2', 'linear')
NAMES_HELP = f"'ShuffleV1', 'ShuffleV2' or 'ShuffleV2_<size>' (size one of {', '.join(V2_SIZES)})"


def build(name: str, num_classes: int, **kwargs):
  match = _NAME.match(name)
  if not match:
    return None
  kwargs.pop('scan_blocks', None)  # not scanned
  if match[1] == 'ShuffleV1':
    if match[2]:
      raise ValueError(f'model {name!r}: ShuffleV1 has no sizes; use ShuffleV1')
    return ShuffleV1(num_classes, **kwargs)
  size = match[2] or '1'
  if size not in V2_SIZES:
    raise ValueError(f'model {name!r}: size {size} is not one of {", ".join(V2_SIZES)}')
  return ShuffleV2(num_classes, *V2_SIZES[size], **kwargs)


def torch_module(path: Sequence[str]) -> str:
  """('layer2_3', 'conv1') -> 'layer2.3.conv1'."""
  return '.'.join((re.sub(r'^(layer\d+)_(\d+)$', r'\1.\2', path[0]), *path[1:]))
