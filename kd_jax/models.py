"""CIFAR ResNets that return their logits and the activations distillation reads.

Two families, both with 16/32/64-channel stages of basic blocks and depth 6n+2:
- `resnet_32_<depth>`: the reference repository's model as its code builds it: a 7x7
  stem with padding 1 (32x32 images give 28/14/7 maps) and 1x1-conv projection
  shortcuts.
- `resnet<depth>`: He et al. (2016)'s CIFAR ResNet: a 3x3 stem (32/16/8 maps) and
  parameter-free shortcuts (stride-2 subsampling, zero channel padding, "option A"),
  so ResNet-20 has the 0.27M parameters quoted in the literature.

Every model maps images [N, 32, 32, 3] to `(logits, features)` where features holds
'stem', 'stage1', 'stage2', 'stage3' (post-ReLU, NHWC) and 'pooled' ([N, 64]).

Variables are named `conv1`, `bn1` (stem), `layer{s}_{j}` (block j of stage s = 1..3,
n blocks each) and `fc`. By default (`scan_blocks=True`) blocks 1..n-1 of a stage,
which all have the same shapes, run as one `nn.scan` named `layer{s}_blocks` whose
variables carry a leading axis of size n-1 (block j at index j-1), so compile time does
not grow with depth; block 0, which may change stride and width, stays `layer{s}_0`.
A scan of at most `unroll_blocks` (4) blocks is unrolled in the compiled program, with
the same variables: no loop copies its activations through stacked buffers, which made
a ResNet-20 step 3-4% faster on a 2-core CPU; a ResNet-110's stages stay loops.
`scan_blocks=False` unrolls every block as `layer{s}_{j}`; `stack_blocks` and
`unstack_blocks` convert variables between the two layouts. Convolutions have a
hand-written gradient (`nhwc_conv`) that XLA:CPU runs in a loop (scanned blocks, scanned
train steps) as fast as unrolled code.
"""
import functools
import math
import operator
import re
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np

FEATURE_NAMES = ('stem', 'stage1', 'stage2', 'stage3', 'pooled')
STAGE_WIDTHS = (16, 32, 64)
# The collections a scanned stage stacks (leading axis: block); the model has no others.
SCANNED_COLLECTIONS = ('params', 'batch_stats')

# PyTorch's kaiming_normal_(mode='fan_out', nonlinearity='relu'): untruncated normal.
conv_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


def torch_linear_bias_init(fan_in: int):
  """PyTorch's default Linear bias: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


class BatchNorm(nn.Module):
  """BatchNorm with PyTorch's statistics, optionally across devices.

  Normalises with the biased batch variance but updates the running variance with
  the unbiased one (n / (n - 1)), as torch.nn.BatchNorm2d does; flax.linen.BatchNorm
  keeps the biased one, which the reference's small-batch statistics would expose.
  The variance is the two-pass mean of squared deviations (more exact than
  E[x^2] - E[x]^2). With `axis_name`, statistics are over the global batch of all
  devices on that axis, so N devices compute what one device computes.
  Statistics are computed in at least float32 whatever the compute dtype.
  """
  use_running_average: bool
  momentum: float = 0.9
  epsilon: float = 1e-5
  axis_name: Optional[str] = None
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    features = x.shape[-1]
    scale = self.param('scale', nn.initializers.ones, (features,), self.param_dtype)
    bias = self.param('bias', nn.initializers.zeros, (features,), self.param_dtype)
    running_mean = self.variable('batch_stats', 'mean', jnp.zeros, (features,), self.param_dtype)
    running_var = self.variable('batch_stats', 'var', jnp.ones, (features,), self.param_dtype)

    stats_dtype = jnp.promote_types(jnp.promote_types(x.dtype, scale.dtype), jnp.float32)
    if self.use_running_average:
      mean, var = running_mean.value, running_var.value
    else:
      xs = x.astype(stats_dtype)
      axes = tuple(range(x.ndim - 1))
      count = math.prod(x.shape[:-1])
      mean = jnp.mean(xs, axes)
      if self.axis_name is not None:
        mean = jax.lax.pmean(mean, self.axis_name)
        count *= jax.lax.psum(1, self.axis_name)
      var = jnp.mean(jnp.square(xs - mean), axes)
      if self.axis_name is not None:
        var = jax.lax.pmean(var, self.axis_name)
      if not self.is_initializing():
        m = self.momentum
        running_mean.value = m * running_mean.value + (1 - m) * mean
        running_var.value = m * running_var.value + (1 - m) * var * (count / (count - 1))

    mul = scale * jax.lax.rsqrt(var.astype(stats_dtype) + self.epsilon)
    y = (x.astype(stats_dtype) - mean) * mul + bias
    return y.astype(self.dtype or x.dtype)


# Examples per partial weight gradient on XLA:CPU (see _conv_bwd); 8-32 are about
# equally fast on a 2-core x86 machine, the whole batch of 128 is 2-4x slower.
WGRAD_CPU_CHUNK = 16


def _nhwc_conv(x, kernel, strides=(1, 1), padding=((0, 0), (0, 0)), lhs_dilation=(1, 1),
               rhs_dilation=(1, 1)):
  return jax.lax.conv_general_dilated(x, kernel, strides, padding, lhs_dilation, rhs_dilation,
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv(x, kernel, strides, padding):
  return _nhwc_conv(x, kernel, strides, padding)


def _conv_fwd(x, kernel, strides, padding):
  return _nhwc_conv(x, kernel, strides, padding), (x, kernel)


def _conv_bwd(strides, padding, residuals, dy):
  x, kernel = residuals
  k, size, out = kernel.shape[:2], x.shape[1:3], dy.shape[1:3]
  # Rows of the padded input that the last window does not reach (stride > 1) take
  # no gradient: the transposed convolution pads them back, the kernel's gradient
  # leaves them out.
  unused = [n + lo + hi - ((o - 1) * s + kk) for n, (lo, hi), o, s, kk
            in zip(size, padding, out, strides, k)]
  dx = _nhwc_conv(dy, jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2),
                  padding=[(kk - 1 - lo, kk - 1 - hi + u)
                           for kk, (lo, hi), u in zip(k, padding, unused)],
                  lhs_dilation=strides)
  dkernel_padding = [(lo, hi - u) for (lo, hi), u in zip(padding, unused)]

  def dkernel(chunk):
    # Input channels as the batch and examples as the features give [c_in, kh, kw, c_out].
    def part(xs, dys):
      return _nhwc_conv(xs.transpose(3, 1, 2, 0), dys.transpose(1, 2, 0, 3),
                        padding=dkernel_padding, rhs_dilation=strides)
    starts = range(0, x.shape[0], chunk)
    return sum(part(x[i:i + chunk], dy[i:i + chunk]) for i in starts).transpose(1, 2, 0, 3)

  # XLA:CPU runs this convolution, whose "kernel" is the whole batch of output
  # gradients, 2-4x faster as a sum over chunks of WGRAD_CPU_CHUNK examples (they fit
  # in cache); other backends get one convolution.
  dk = jax.lax.platform_dependent(cpu=lambda: dkernel(WGRAD_CPU_CHUNK),
                                  default=lambda: dkernel(x.shape[0]))
  return dx, dk


_conv.defvjp(_conv_fwd, _conv_bwd)


def nhwc_conv(lhs, rhs, window_strides, padding, *, lhs_dilation, rhs_dilation,
              dimension_numbers, feature_group_count, precision):
  """lax.conv_general_dilated for nn.Conv (NHWC, HWIO), with a gradient made of NHWC
  convolutions too.

  Autodiff of lax's convolution gives convolutions of other layouts, which XLA:CPU
  runs with a naive kernel inside loops (jax-ml/jax#12868): in a scanned stage or a
  scan over train steps, a ResNet-20 step was ~10x slower. Outside loops XLA
  rewrites them into these same NHWC convolutions, so this costs nothing there.
  """
  assert (set(lhs_dilation) == set(rhs_dilation) == {1} and feature_group_count == 1
          and precision is None and dimension_numbers == jax.lax.conv_dimension_numbers(
              lhs.shape, rhs.shape, ('NHWC', 'HWIO', 'NHWC'))), 'not a plain NHWC conv'
  return _conv(lhs, rhs, tuple(window_strides), tuple(map(tuple, padding)))


class BasicBlock(nn.Module):
  """relu(shortcut(x) + bn2(conv2(relu(bn1(conv1(x))))))."""
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
    return nn.relu(shortcut + y)


class CifarResNet(nn.Module):
  """A 3-stage CIFAR ResNet; `__call__` returns (logits, features).

  `dtype` is the compute dtype (e.g. jnp.bfloat16 on accelerators); parameters
  stay `param_dtype`. With dtype None the computation follows the variables' dtype,
  so float64 variables give a float64 forward pass.
  """
  stage_sizes: Sequence[int]
  num_classes: int
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
    conv = functools.partial(nn.Conv, use_bias=False, padding=1, kernel_init=conv_init,
                             dtype=self.dtype, param_dtype=self.param_dtype,
                             conv_general_dilated=nhwc_conv)
    norm = functools.partial(BatchNorm, use_running_average=not train, momentum=self.bn_momentum,
                             axis_name=self.axis_name, dtype=self.dtype,
                             param_dtype=self.param_dtype)
    if self.dtype is not None:
      x = x.astype(self.dtype)
    k, p = self.stem_kernel, self.stem_padding
    x = conv(STAGE_WIDTHS[0], (k, k), 1, padding=p, name='conv1')(x)
    x = nn.relu(norm(name='bn1')(x))
    features = {'stem': x}
    for i, (num_blocks, width) in enumerate(zip(self.stage_sizes, STAGE_WIDTHS)):
      block = functools.partial(BasicBlock, width, conv=conv, norm=norm,
                                projection_shortcut=self.projection_shortcut)
      x = block(2 if i > 0 else 1, name=f'layer{i + 1}_0')(x)
      if self.scan_blocks and num_blocks > 1:
        blocks = nn.scan(lambda module, x, _: (module(x), None),
                         variable_axes={c: 0 for c in SCANNED_COLLECTIONS},
                         split_rngs={'params': True}, length=num_blocks - 1,
                         unroll=num_blocks - 1 if num_blocks - 1 <= self.unroll_blocks else 1)
        x, _ = blocks(block(1, name=f'layer{i + 1}_blocks'), x, None)
      else:
        for j in range(1, num_blocks):
          x = block(1, name=f'layer{i + 1}_{j}')(x)
      features[f'stage{i + 1}'] = x
    x = jnp.mean(x, axis=(1, 2))
    features['pooled'] = x
    logits = nn.Dense(self.num_classes, kernel_init=nn.initializers.xavier_uniform(),
                      bias_init=torch_linear_bias_init(x.shape[-1]), dtype=self.dtype,
                      param_dtype=self.param_dtype, name='fc')(x)
    return logits, features


_MODEL_NAME = re.compile(r'^(resnet_32_|resnet)(\d+)$')
MODEL_NAME_HELP = ("'resnet_32_<depth>' (the reference's 7x7-stem model) or 'resnet<depth>' "
                   "(He et al.'s 3x3-stem model), depth 6n+2: 8, 14, 20, 32, 44, 56, 110, ...")


def create_model(name: str, num_classes: int, **kwargs) -> CifarResNet:
  """Builds a model by name, e.g. 'resnet_32_20', 'resnet_32_110', 'resnet56'.

  kwargs go to CifarResNet (dtype, axis_name, bn_momentum, ...).
  """
  match = _MODEL_NAME.match(name)
  depth = int(match.group(2)) if match else 0
  if not match or depth < 8 or (depth - 2) % 6:
    raise ValueError(f'unknown model {name!r}; expected {MODEL_NAME_HELP}')
  n = (depth - 2) // 6
  if match.group(1) == 'resnet_32_':
    variant = dict(stem_kernel=7, stem_padding=1, projection_shortcut=True)
  else:
    variant = dict(stem_kernel=3, stem_padding=1, projection_shortcut=False)
  return CifarResNet(stage_sizes=(n, n, n), num_classes=num_classes, **variant, **kwargs)


def init_variables(model: CifarResNet, rng, image_shape=(32, 32, 3)):
  """Initial {'params', 'batch_stats'} of `model` for images of `image_shape`."""
  dummy = jnp.zeros((1, *image_shape), jnp.float32)
  return jax.jit(functools.partial(model.init, train=False))(rng, dummy)


def variable_shapes(model: CifarResNet, image_shape=(32, 32, 3)):
  """init_variables' structure as ShapeDtypeStructs, without computing anything."""
  return jax.eval_shape(lambda rng: init_variables(model, rng, image_shape), jax.random.key(0))


_BLOCK = re.compile(r'(layer\d+)_(\d+)')
_STACKED = re.compile(r'(layer\d+)_blocks')


def _stack(leaves):
  # numpy stays numpy, keeping float64 whatever jax's x64 setting; the rest goes to jax.
  return np.stack(leaves) if all(isinstance(a, np.ndarray) for a in leaves) else jnp.stack(leaves)


def _per_collection(fn, variables):
  return {c: fn(tree) if c in SCANNED_COLLECTIONS else tree for c, tree in variables.items()}


def stack_blocks(variables):
  """Unrolled layout -> scanned: `layer{s}_{j}` for j >= 1 become `layer{s}_blocks`.

  Takes {'params', 'batch_stats'} or any part of them; other collections, block 0,
  and variables already in the scanned layout pass through unchanged.
  """
  def stack(modules):
    out, stages = {}, {}
    for name, tree in modules.items():
      m = _BLOCK.fullmatch(name)
      if m and int(m[2]) > 0:
        out.setdefault(f'{m[1]}_blocks', None)  # where the stage's block 1 was
        stages.setdefault(f'{m[1]}_blocks', {})[int(m[2])] = tree
      else:
        out[name] = tree
    for name, blocks in stages.items():
      out[name] = jax.tree.map(lambda *xs: _stack(xs), *(blocks[j] for j in sorted(blocks)))
    return out

  return _per_collection(stack, variables)


def unstack_blocks(variables):
  """Scanned layout -> unrolled, the inverse of stack_blocks."""
  def unstack(modules):
    out = {}
    for name, tree in modules.items():
      m = _STACKED.fullmatch(name)
      if m:
        for i in range(len(jax.tree.leaves(tree)[0])):
          out[f'{m[1]}_{i + 1}'] = jax.tree.map(operator.itemgetter(i), tree)
      else:
        out[name] = tree
    return out

  return _per_collection(unstack, variables)


def to_layout_of(variables, template):
  """`variables` (either layout) in the layout of `template`: scanned where it has
  `layer{s}_blocks` modules, unrolled otherwise."""
  scanned = any(_STACKED.fullmatch(name)
                for c in SCANNED_COLLECTIONS for name in template.get(c, {}))
  return stack_blocks(variables) if scanned else unstack_blocks(variables)


def check_variables(variables, template, source: str):
  """Raises ValueError unless `variables` has the names and shapes of `template`."""
  got = traverse_util.flatten_dict({k: variables.get(k, {}) for k in ('params', 'batch_stats')})
  want = traverse_util.flatten_dict({k: template[k] for k in ('params', 'batch_stats')})
  missing = sorted('/'.join(k) for k in want.keys() - got.keys())
  unexpected = sorted('/'.join(k) for k in got.keys() - want.keys())
  if missing or unexpected:
    raise ValueError(f'{source} does not fit the model: missing {missing[:4]}'
                     f'{" ..." if len(missing) > 4 else ""}, unexpected {unexpected[:4]}'
                     f'{" ..." if len(unexpected) > 4 else ""}')
  for k, v in want.items():
    if got[k].shape != v.shape:
      raise ValueError(f"{source} does not fit the model: {'/'.join(k)} has shape "
                       f'{tuple(got[k].shape)}, the model expects {tuple(v.shape)}')
