"""`vid`: variational information distillation (Ahn et al., CVPR 2019) as mdistiller
codes it (distillers/VID.py). Per stage pair (feats[1:]), the larger map pooled to the
other's size; a regressor conv1x1(s_C, t_C) ReLU conv1x1(t_C, t_C) ReLU conv1x1(t_C, t_C)
(no biases, PyTorch's default initialisation) predicts the teacher's map with a per
channel variance var = softplus(log_scale) + eps; the term is the mean over batch,
channels and positions of 0.5 ((mu - f_t)^2 / var + log var); summed over stages, times
weight. Defaults: engine/cfg.py VID (FEAT_WEIGHT 1, CE_WEIGHT 1, EPS 1e-5,
INIT_PRED_VAR 5).

mdistiller keeps its log_scales in a plain list, so they are never trained: var stays
`init_pred_var`. RepDistiller's VIDLoss registers and trains them:
`train_log_scale=True` makes them parameters (`log_scales_<i>`).
Variables: params regressors_<i>_<j>/kernel (j = 0, 2, 4, the original's Sequential
indices), as feature.flax_path maps the original's state_dict.
"""
import math
from typing import Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from kd_jax import methods
from kd_jax.methods import feature
from kd_jax.models import layers


def initial_log_scale(init_pred_var, eps):
  """log(exp(init_pred_var - eps) - 1): softplus of it plus eps is init_pred_var."""
  return math.log(math.expm1(init_pred_var - eps))


def vid_loss(mean, f_t, log_scale, eps):
  var = jnp.logaddexp(0.0, log_scale) + eps  # log(1 + exp(log_scale)) + eps
  return jnp.mean(0.5 * (jnp.square(mean - f_t) / var + jnp.log(var)))


class VID(nn.Module):
  cfg: object
  pairs: Sequence[Tuple[str, str]]
  channels: Sequence[Tuple[int, int]]  # (student, teacher) channels per pair

  @nn.compact
  def __call__(self, student, teacher, batch, progress, train: bool = True):
    del batch, progress, train
    cfg, total = self.cfg, 0.0
    for i, ((s, t), (_, t_c)) in enumerate(zip(self.pairs, self.channels)):
      f_s, f_t = feature.pool_larger(student[s], jax.lax.stop_gradient(teacher[t]))
      x = f_s
      for j in (0, 2, 4):
        if j:
          x = nn.relu(x)
        x = nn.Conv(t_c, (1, 1), padding=0, use_bias=False,
                    kernel_init=feature.torch_default_init,
                    conv_general_dilated=layers.nhwc_conv, name=f'regressors_{i}_{j}')(x)
      start = initial_log_scale(cfg.init_pred_var, cfg.eps)
      if cfg.train_log_scale:
        log_scale = self.param(f'log_scales_{i}', nn.initializers.constant(start), (t_c,))
      else:
        log_scale = jnp.full((t_c,), start, jnp.float32)
      total += vid_loss(x, f_t, log_scale.astype(x.dtype), cfg.eps)
    return {'vid': cfg.weight * total}


def _build(cfg, ctx):
  pairs = feature.stage_pairs(ctx.student, ctx.teacher)
  feature.check_pairs(ctx, pairs, 'vid')
  channels = [(ctx.student[s].shape[-1], ctx.teacher[t].shape[-1]) for s, t in pairs]
  return VID(cfg, tuple(pairs), tuple(channels))


VID_METHOD = methods.register(methods.Method(
    name='vid', doc="Variational information distillation as mdistiller's VID.py.",
    build=_build, ce_weight=lambda cfg: cfg.ce_weight,
    fields={
        'weight': methods.Field(1.0, 'loss weight (engine/cfg.py VID.LOSS.FEAT_WEIGHT)',
                                methods.non_negative, 'a number >= 0'),
        'eps': methods.Field(1e-5, 'added to the predicted variance (VID.EPS)',
                             methods.positive, 'a number > 0'),
        'init_pred_var': methods.Field(5.0, 'initial predicted variance (VID.INIT_PRED_VAR)',
                                       methods.positive, 'a number > 0'),
        'train_log_scale': methods.Field(False, "train the variances (RepDistiller's VIDLoss); "
                                         'mdistiller never does', lambda v: isinstance(v, bool),
                                         'True or False'),
        'ce_weight': methods.Field(1.0, 'cross-entropy weight (VID.LOSS.CE_WEIGHT)',
                                   methods.non_negative, 'a number >= 0'),
    }))
