"""VGG with BatchNorm for CIFAR, `vgg8, vgg11, vgg13, vgg16, vgg19`, as mdistiller's and
RepDistiller's `vgg.py` build them (their `cifar_model_dict` maps each name to the `_bn`
model): five blocks of 3x3 conv (with bias) + BN + ReLU, 2x2 max pooling after blocks
0-2 (32x32 images give 32/16/8/4/4 maps), global average pooling, a linear classifier.

Features as mdistiller: 'stem' is block 0's output after its ReLU, 'stage<i>' (i = 1..4)
block i's output after its last ReLU, 'preact_stage<i>' before it, 'pooled' [N, 512].
Variables: `block{b}_conv{k}`, `block{b}_bn{k}` (PyTorch `block{b}.{3k}`,
`block{b}.{3k+1}`) and `classifier`. Blocks are not scanned (each layer differs).
"""
import functools
import re
from typing import Any, Optional, Sequence, Tuple

import flax.linen as nn
import jax.numpy as jnp

from kd_jax.models.layers import BatchNorm, conv_init, nhwc_conv, torch_linear_bias_init

CONFIGS = {
    8: ((64,), (128,), (256,), (512,), (512,)),
    11: ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    13: ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
    16: ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
    19: ((64, 64), (128, 128), (256, 256, 256, 256), (512, 512, 512, 512),
         (512, 512, 512, 512)),
}


class VGG(nn.Module):
  blocks: Tuple[Tuple[int, ...], ...]
  num_classes: int
  dtype: Any = None
  param_dtype: Any = jnp.float32
  bn_momentum: float = 0.9
  axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, x, train: bool):
    conv = functools.partial(nn.Conv, kernel_size=(3, 3), padding=1, kernel_init=conv_init,
                             dtype=self.dtype, param_dtype=self.param_dtype,
                             conv_general_dilated=nhwc_conv)
    norm = functools.partial(BatchNorm, use_running_average=not train, momentum=self.bn_momentum,
                             axis_name=self.axis_name, dtype=self.dtype,
                             param_dtype=self.param_dtype)
    if self.dtype is not None:
      x = x.astype(self.dtype)
    features = {}
    for b, widths in enumerate(self.blocks):
      for k, width in enumerate(widths):
        if k:
          x = nn.relu(x)
        x = conv(width, name=f'block{b}_conv{k}')(x)
        x = norm(name=f'block{b}_bn{k}')(x)
      if b:
        features[f'preact_stage{b}'] = x
      x = nn.relu(x)
      features['stem' if b == 0 else f'stage{b}'] = x
      if b < 3:
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = jnp.mean(x, axis=(1, 2))
    features['pooled'] = x
    logits = nn.Dense(self.num_classes, kernel_init=nn.initializers.normal(0.01),
                      bias_init=torch_linear_bias_init(x.shape[-1]), dtype=self.dtype,
                      param_dtype=self.param_dtype, name='classifier')(x)
    return logits, features


_NAME = re.compile(r'^vgg(\d+)$')
# Top-level modules outside RepDistiller's get_feat_modules().
HEAD = ('classifier',)
NAMES_HELP = "'vgg8', 'vgg11', 'vgg13', 'vgg16' or 'vgg19' (with BatchNorm)"


def build(name: str, num_classes: int, **kwargs) -> Optional[VGG]:
  match = _NAME.match(name)
  if not match:
    return None
  depth = int(match[1])
  if depth not in CONFIGS:
    raise ValueError(f'model {name!r}: depth {depth} is not one of {sorted(CONFIGS)}')
  kwargs.pop('scan_blocks', None)  # nothing to scan
  return VGG(CONFIGS[depth], num_classes, **kwargs)


def torch_module(path: Sequence[str]) -> str:
  """('block2_conv1',) -> 'block2.3'; ('block2_bn1',) -> 'block2.4'."""
  m = re.fullmatch(r'(block\d+)_(conv|bn)(\d+)', path[0])
  if not m:
    return '.'.join(path)
  return f'{m[1]}.{3 * int(m[3]) + (m[2] == "bn")}'
