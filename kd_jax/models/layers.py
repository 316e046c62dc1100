"""Layers shared by the model families, matching PyTorch's definitions.

- `BatchNorm`: PyTorch's statistics (unbiased running variance), optionally synchronised
  over a pmap axis.
- `nhwc_conv`: `nn.Conv`'s convolution with a gradient made of NHWC convolutions (fast
  on XLA:CPU inside loops).
- PyTorch's default initialisers where the families use them.
"""
import functools
import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

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
               rhs_dilation=(1, 1), groups=1, batch_groups=1):
  return jax.lax.conv_general_dilated(x, kernel, strides, padding, lhs_dilation, rhs_dilation,
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                                      feature_group_count=groups, batch_group_count=batch_groups)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv(x, kernel, strides, padding, groups):
  return _nhwc_conv(x, kernel, strides, padding, groups=groups)


def _conv_fwd(x, kernel, strides, padding, groups):
  return _nhwc_conv(x, kernel, strides, padding, groups=groups), (x, kernel)


def _conv_bwd(strides, padding, groups, residuals, dy):
  x, kernel = residuals
  dilated = lambda: _input_grad_dilated(dy, kernel, x.shape[1:3], strides, padding, groups)
  chunked = lambda chunk: lambda: _kernel_grad(x, dy, kernel.shape, strides, padding, groups,
                                               chunk)
  if groups == 1 and max(strides) > 1:
    # XLA:CPU runs the transposed convolution over the stride-dilated output gradient
    # (three zeros in four for stride 2) 2-3x slower than these per-phase convolutions.
    dx = jax.lax.platform_dependent(
        cpu=lambda: _input_grad_phases(dy, kernel, x.shape[1:3], strides, padding),
        default=dilated)
  else:
    dx = dilated()
  if groups == 1 and kernel.shape[:2] == (1, 1):
    # A 1x1 kernel's gradient is one matmul, which XLA:CPU runs ~2x faster than the
    # convolution.
    dk = jax.lax.platform_dependent(
        cpu=lambda: _kernel_grad_1x1(x, dy, strides, padding), default=chunked(x.shape[0]))
  else:
    # XLA:CPU runs this convolution, whose "kernel" is the whole batch of output
    # gradients, 2-4x faster as a sum over chunks of WGRAD_CPU_CHUNK examples (they fit
    # in cache); other backends get one convolution.
    dk = jax.lax.platform_dependent(cpu=chunked(WGRAD_CPU_CHUNK), default=chunked(x.shape[0]))
  return dx, dk


def _unused(x_hw, kernel_hw, strides, padding, out_hw):
  """Rows of the padded input that the last window does not reach (stride > 1): they
  take no gradient."""
  return [n + lo + hi - ((o - 1) * s + k) for n, (lo, hi), o, s, k
          in zip(x_hw, padding, out_hw, strides, kernel_hw)]


def _input_grad_dilated(dy, kernel, x_hw, strides, padding, groups):
  """The input gradient as the transposed convolution: the flipped kernel over the
  stride-dilated output gradient, padded back to the input's size."""
  k = kernel.shape[:2]
  unused = _unused(x_hw, k, strides, padding, dy.shape[1:3])
  # The transposed kernel of each group: [kh, kw, c_in/g, g, c_out/g] -> [kh, kw, c_out/g, c_in].
  kh, kw, group_in, c_out = kernel.shape
  flipped = jnp.flip(kernel, (0, 1)).reshape(kh, kw, group_in, groups, c_out // groups)
  return _nhwc_conv(dy, flipped.transpose(0, 1, 4, 3, 2).reshape(kh, kw, c_out // groups, -1),
                    padding=[(kk - 1 - lo, kk - 1 - hi + u)
                             for kk, (lo, hi), u in zip(k, padding, unused)],
                    lhs_dilation=strides, groups=groups)


def _phase_taps(n, k, s, lo, o):
  """Per phase r of one axis (input rows i = s*m + r): the kernel taps that reach it,
  reversed, the output gradient's padding (lo, hi; negative: cropped) that makes it a
  stride-1 correlation, and its length. From i + lo = s*o' + t: the taps t = p, p + s, ...
  with p = (r + lo) mod s, and dx[s*m + r] = sum_j dy[m + (r + lo) // s - j] w[p + s*j]."""
  phases = []
  for r in range(s):
    p, q = (r + lo) % s, (r + lo) // s
    taps = list(range(p, k, s))[::-1]
    m = -(-(n - r) // s)
    pad_lo = len(taps) - 1 - q
    phases.append((taps, pad_lo, m - o - pad_lo + len(taps) - 1, m))
  return phases


def _input_grad_phases(dy, kernel, x_hw, strides, padding):
  """The input gradient of a strided convolution (no groups) as one stride-1
  convolution per phase of the input (its rows and columns modulo the strides), each
  with the kernel taps that reach that phase, interleaved: no multiplications by the
  zeros of a dilated output gradient."""
  n, c_in = dy.shape[0], kernel.shape[2]
  rows, cols = (_phase_taps(*args) for args in zip(
      x_hw, kernel.shape[:2], strides, (lo for lo, _ in padding), dy.shape[1:3]))
  size = (rows[0][3], cols[0][3])  # phase 0 is the longest
  grid = []
  for taps_h, lo_h, hi_h, m_h in rows:
    grid.append([])
    for taps_w, lo_w, hi_w, m_w in cols:
      if not taps_h or not taps_w:  # a stride larger than the kernel: no tap reaches it
        part = jnp.zeros((n, m_h, m_w, c_in), dy.dtype)
      else:
        sub = kernel[np.array(taps_h)][:, np.array(taps_w)].transpose(0, 1, 3, 2)
        crop = dy[:, max(-lo_h, 0):dy.shape[1] - max(-hi_h, 0),
                  max(-lo_w, 0):dy.shape[2] - max(-hi_w, 0)]
        part = _nhwc_conv(crop, sub, padding=((max(lo_h, 0), max(hi_h, 0)),
                                              (max(lo_w, 0), max(hi_w, 0))))
      grid[-1].append(jnp.pad(part, ((0, 0), (0, size[0] - m_h), (0, size[1] - m_w), (0, 0))))
  # [n, size_h, stride_h, size_w, stride_w, c_in] -> the input's rows and columns.
  dx = jnp.stack([jnp.stack(row, 3) for row in grid], 2)
  dx = dx.reshape(n, size[0] * strides[0], size[1] * strides[1], c_in)
  return dx[:, :x_hw[0], :x_hw[1]]


def _kernel_grad(x, dy, kernel_shape, strides, padding, groups, chunk):
  """The kernel's gradient as a convolution of the input (channels as the batch,
  examples as the features) by the output gradient, summed over chunks of examples."""
  unused = _unused(x.shape[1:3], kernel_shape[:2], strides, padding, dy.shape[1:3])
  dkernel_padding = [(lo, hi - u) for (lo, hi), u in zip(padding, unused)]

  # With groups, batch groups pair each group's input channels with its outputs only:
  # [c_in, kh, kw, c_out].
  def part(xs, dys):
    return _nhwc_conv(xs.transpose(3, 1, 2, 0), dys.transpose(1, 2, 0, 3),
                      padding=dkernel_padding, rhs_dilation=strides, batch_groups=groups)
  starts = range(0, x.shape[0], chunk)
  return sum(part(x[i:i + chunk], dy[i:i + chunk]) for i in starts).transpose(1, 2, 0, 3)


def _kernel_grad_1x1(x, dy, strides, padding):
  (_, _, tap), = _taps(x, (1, 1), strides, padding)
  return jnp.einsum('bhwi,bhwo->io', tap, dy)[None, None]


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
  assert (set(lhs_dilation) == set(rhs_dilation) == {1}
          and precision is None and dimension_numbers == jax.lax.conv_dimension_numbers(
              lhs.shape, rhs.shape, ('NHWC', 'HWIO', 'NHWC'))), 'not a plain NHWC conv'
  strides, padding = tuple(window_strides), tuple(map(tuple, padding))
  conv = lambda: _conv(lhs, rhs, strides, padding, feature_group_count)
  cpu_form = _grouped_cpu_form(lhs.shape[-1], rhs.shape, feature_group_count)
  if cpu_form is None:
    return conv()
  # XLA:CPU runs grouped convolutions 5-20x slower than the same arithmetic as
  # elementwise products (depthwise) or a batched matmul (grouped 1x1): see below.
  return jax.lax.platform_dependent(cpu=lambda: cpu_form(lhs, rhs, strides, padding),
                                    default=conv)


def _grouped_cpu_form(c_in, kernel_shape, groups):
  """The plain-XLA form of a grouped convolution for XLA:CPU, or None (use _conv):
  depthwise (groups = c_in = c_out) as a sum over the kernel's taps of strided slices
  times per-channel weights, grouped 1x1 as a matmul batched over groups. Autodiff of
  both gives slices, pads and reductions, which XLA:CPU fuses."""
  kh, kw, group_in, c_out = kernel_shape
  if groups == 1:
    return None
  if group_in == 1 and c_out == c_in == groups:
    return _depthwise
  if kh == kw == 1:
    return _grouped_1x1
  return None


def _taps(x, kernel_hw, strides, padding):
  """The strided window slices of x, one per kernel tap (i, j)."""
  x = jnp.pad(x, ((0, 0), *padding, (0, 0)))
  out = [(n - k) // s + 1 for n, k, s in zip(x.shape[1:3], kernel_hw, strides)]
  for i in range(kernel_hw[0]):
    for j in range(kernel_hw[1]):
      limit = (x.shape[0], i + (out[0] - 1) * strides[0] + 1,
               j + (out[1] - 1) * strides[1] + 1, x.shape[3])
      yield i, j, jax.lax.slice(x, (0, i, j, 0), limit, (1, *strides, 1))


def _depthwise(x, kernel, strides, padding):
  return sum(tap * kernel[i, j, 0] for i, j, tap in _taps(x, kernel.shape[:2], strides, padding))


def _grouped_1x1(x, kernel, strides, padding):
  (_, _, tap), = _taps(x, (1, 1), strides, padding)
  b, h, w, c_in = tap.shape
  _, _, group_in, c_out = kernel.shape
  groups = c_in // group_in
  k = kernel.reshape(group_in, groups, c_out // groups)
  y = jnp.einsum('bhwgi,igo->bhwgo', tap.reshape(b, h, w, groups, group_in), k)
  return y.reshape(b, h, w, c_out)


def conv_and_norm(module: nn.Module, train: bool):
  """The families' `nn.Conv` (no bias, padding 1, PyTorch's init, the fast NHWC
  gradient) and `BatchNorm` factories, from the model's dtype, param_dtype, bn_momentum
  and axis_name."""
  conv = functools.partial(nn.Conv, use_bias=False, padding=1, kernel_init=conv_init,
                           dtype=module.dtype, param_dtype=module.param_dtype,
                           conv_general_dilated=nhwc_conv)
  norm = functools.partial(BatchNorm, use_running_average=not train,
                           momentum=module.bn_momentum, axis_name=module.axis_name,
                           dtype=module.dtype, param_dtype=module.param_dtype)
  return conv, norm
