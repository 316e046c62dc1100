"""`fitnet`: FitNets hints (Romero et al., ICLR 2015) as mdistiller codes it
(distillers/FitNet.py, ConvReg in distillers/_common.py; RepDistiller's `hint` is the
same): the student's hint feature (feats[hint_layer]: 0 the stem, i stage<i>) goes
through a trained regressor, ConvReg = conv, BatchNorm (batch statistics in training),
ReLU, and weight * MSE(regressor(f_s), f_t). Defaults: engine/cfg.py FITNET (HINT_LAYER
2, FEAT_WEIGHT 100, CE_WEIGHT 1).

ConvReg's conv follows the two maps' heights: 2x larger student: 3x3 stride 2 padding 1;
2x smaller: ConvTranspose 4x4 stride 2 padding 1; otherwise a VALID conv of kernel
(1 + s_H - t_H, 1 + s_W - t_W) (1x1 for equal sizes); all with bias, PyTorch's default
initialisation. Its variables: params conv_reg/conv, conv_reg/bn and batch_stats
conv_reg/bn, as the original's state_dict names them (see feature.flax_path).
mdistiller sizes ConvReg by running both models once in train mode on a noise image,
which moves the loaded teacher's BatchNorm statistics 10% toward that image's; kd_jax
sizes it from shapes and leaves the teacher as loaded.
"""
from typing import Optional, Tuple

import flax.linen as nn
import jax

from kd_jax import methods
from kd_jax.methods import feature
from kd_jax.methods.common import mse, wide
from kd_jax.models import layers


def hint_key(layer: int) -> str:
  return 'stem' if layer == 0 else f'stage{layer}'


def conv_kind(s_shape, t_shape):
  """Which conv ConvReg uses between per-example NHWC shapes (H, W, C), by the heights."""
  (s_h, s_w, _), (t_h, t_w, _) = s_shape, t_shape
  if s_h == 2 * t_h:
    return 'down'
  if 2 * s_h == t_h:
    return 'up'
  if s_h >= t_h and s_w >= t_w:
    return 'valid'
  raise ValueError(f'no ConvReg from a {s_h}x{s_w} student map to a {t_h}x{t_w} teacher map')


def conv_for(s_shape, t_shape, name='conv') -> nn.Module:
  """ConvReg's conv: its kind, PyTorch's default initialisation."""
  (s_h, s_w, s_c), (t_h, t_w, t_c) = s_shape, t_shape
  # PyTorch's bias bound is 1/sqrt(fan_in) with fan_in from dim 1 of the weight: in * kh * kw
  # for a Conv2d [out, in, kh, kw], out * kh * kw for a ConvTranspose2d [in, out, kh, kw].
  bias = lambda fan_in: layers.torch_linear_bias_init(fan_in)
  kind = conv_kind(s_shape, t_shape)
  if kind == 'down':
    return nn.Conv(t_c, (3, 3), strides=2, padding=1, conv_general_dilated=layers.nhwc_conv,
                   kernel_init=feature.torch_default_init, bias_init=bias(s_c * 9), name=name)
  if kind == 'up':
    # ConvTranspose2d(k=4, s=2, p=1) pads the dilated input by k - 1 - p; its IOHW weight
    # in Flax's layout (kh, kw, out, in) is what transpose_kernel expects.
    return nn.ConvTranspose(t_c, (4, 4), strides=(2, 2), padding=((2, 2), (2, 2)),
                            transpose_kernel=True, kernel_init=feature.torch_default_init,
                            bias_init=bias(t_c * 16), name=name)
  kernel = (1 + s_h - t_h, 1 + s_w - t_w)
  return nn.Conv(t_c, kernel, padding=0, conv_general_dilated=layers.nhwc_conv,
                 kernel_init=feature.torch_default_init,
                 bias_init=bias(s_c * kernel[0] * kernel[1]), name=name)


class ConvReg(nn.Module):
  """mdistiller's ConvReg: conv, BatchNorm, optional ReLU."""
  s_shape: Tuple[int, int, int]
  t_shape: Tuple[int, int, int]
  use_relu: bool = True

  @nn.compact
  def __call__(self, x, train: bool, axis_name: Optional[str] = None):
    x = conv_for(self.s_shape, self.t_shape)(x)
    x = layers.BatchNorm(use_running_average=not train, axis_name=axis_name, name='bn')(x)
    return nn.relu(x) if self.use_relu else x


class FitNet(nn.Module):
  cfg: object
  s_shape: Tuple[int, int, int]
  t_shape: Tuple[int, int, int]

  @nn.compact
  def __call__(self, student, teacher, batch, progress, train: bool = True):
    del progress
    key = hint_key(self.cfg.hint_layer)
    regressed = ConvReg(self.s_shape, self.t_shape, name='conv_reg')(
        wide(student[key]), train, batch.get('axis_name'))
    return {'fitnet': self.cfg.weight * mse(regressed, jax.lax.stop_gradient(teacher[key]))}


def _build(cfg, ctx):
  key = hint_key(cfg.hint_layer)
  if key not in ctx.student or key not in ctx.teacher:
    raise ValueError(f'fitnet hint_layer {cfg.hint_layer}: no {key!r} in both models')
  s_shape, t_shape = tuple(ctx.student[key].shape[1:]), tuple(ctx.teacher[key].shape[1:])
  conv_kind(s_shape, t_shape)  # refuses sizes ConvReg cannot map, before anything runs
  return FitNet(cfg, s_shape, t_shape)


FITNET = methods.register(methods.Method(
    name='fitnet', doc="FitNets hints with mdistiller's ConvReg (distillers/FitNet.py).",
    build=_build, ce_weight=lambda cfg: cfg.ce_weight,
    fields={
        'hint_layer': methods.Field(2, "mdistiller's feats index of the hint: 0 the stem, i "
                                    'stage<i> (engine/cfg.py FITNET.HINT_LAYER)',
                                    lambda v: isinstance(v, int) and not isinstance(v, bool)
                                    and v >= 0, 'an integer >= 0'),
        'weight': methods.Field(100.0, 'loss weight (FITNET.LOSS.FEAT_WEIGHT)',
                                methods.non_negative, 'a number >= 0'),
        'ce_weight': methods.Field(1.0, 'cross-entropy weight (FITNET.LOSS.CE_WEIGHT)',
                                   methods.non_negative, 'a number >= 0'),
    }))
