"""`ofd`: A comprehensive overhaul of feature distillation (Heo et al., ICCV 2019) as
mdistiller's distillers/OFD.py codes it.

The student's pre-ReLU stage features go through a connector (1x1 conv without bias,
then BatchNorm, trained with the student, train mode); the teacher's pre-ReLU features,
average-pooled to the student's size, are the targets of a partial L2 loss that ignores
positions where the teacher is below its margin and the student below both:
(s - m)^2 [s > m, t <= m] + (s - t)^2 [s > t, m < t <= 0] + (s - t)^2 [t > 0], mean over
the batch, summed over the rest, stage i weighted 1 / 2^(n - i), times 0.001.

The margin of each teacher channel is E[x | x < 0] for x ~ N(bias, |weight|^2) of the
teacher's BatchNorm that makes that pre-ReLU feature (mdistiller's get_bn_before_relu),
or -3 |weight| when P(x < 0) <= 0.001; rounded to float32 as the original's FloatTensor.
They are computed in the step from batch['teacher_variables'] (so they follow the
teacher's weights; zeros at init, where only shapes matter). OFD runs the teacher in
train mode (OFD.py overrides train() without teacher.eval()): teacher_bn_mode 'batch'.
Teachers: the resnet, resnetv2, wrn and vgg families (those with get_bn_before_relu in
mdistiller); MobileNetV2 and ShuffleNets cannot be OFD teachers here.
"""
import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp

from kd_jax import methods
from kd_jax.methods.common import wide
from kd_jax.models.layers import BatchNorm


def _stages(shapes):
  return sorted(int(m.group(1)) for k in shapes for m in [re.fullmatch(r'preact_stage(\d+)', k)]
                if m)


def _last(params, prefix):
  """The params of the last `<prefix>_<j>` block, or the last of a scanned stack."""
  blocks = params.get(f'{prefix}_blocks')
  if blocks is not None:
    return jax.tree.map(lambda a: a[-1], blocks)
  js = [int(k[len(prefix) + 1:]) for k in params if re.fullmatch(rf'{prefix}_\d+', k)]
  return params[f'{prefix}_{max(js)}'] if js else None


def teacher_bns(params, stages):
  """{'scale', 'bias'} of the teacher BatchNorm that makes each preact_stage<i>."""
  bns = []
  for i in stages:
    block = _last(params, f'layer{i}')
    if block is not None:  # resnet, resnetv2: the last block's last BN
      bns.append(block['bn3'] if 'bn3' in block else block['bn2'])
    elif f'block{i}_0' in params or 'block1_0' in params:  # wrn: the next BN applied
      bns.append(params[f'block{i + 1}_0']['bn1'] if i < stages[-1] else params['bn1'])
    elif f'block{i}_bn0' in params:  # vgg: the block's last BN
      k = max(int(m.group(1)) for key in params
              for m in [re.fullmatch(rf'block{i}_bn(\d+)', key)] if m)
      bns.append(params[f'block{i}_bn{k}'])
    else:
      raise ValueError('OFD needs a teacher whose pre-ReLU features come from a BatchNorm '
                       '(resnet, resnetv2, wrn, vgg families)')
  return bns


def margins(scale, bias):
  """E[x | x < 0] for x ~ N(bias, |scale|^2), or -3 |scale| where P(x < 0) <= 0.001."""
  s, m = jnp.abs(wide(scale)), wide(bias)
  z = m / jnp.where(s > 0, s, 1.0)
  cdf = jax.scipy.stats.norm.cdf(-z)
  safe = jnp.where(cdf > 0.001, cdf, 1.0)
  expected = -s * jnp.exp(-z**2 / 2) / math.sqrt(2 * math.pi) / safe + m
  return jnp.where(cdf > 0.001, expected, -3 * s).astype(jnp.float32)


def feat_loss(source, target, margin):
  loss = (jnp.square(source - margin) * ((source > margin) & (target <= margin))
          + jnp.square(source - target) * ((source > target) & (target > margin) & (target <= 0))
          + jnp.square(source - target) * (target > 0))
  return jnp.sum(jnp.mean(jnp.abs(loss), axis=0))


def _pool_to(x, size):
  """adaptive_avg_pool2d to (size, size) for an integer ratio: a block mean (NHWC)."""
  b, h, w, c = x.shape
  fh, fw = h // size[0], w // size[1]
  return x.reshape(b, size[0], fh, size[1], fw, c).mean(axis=(2, 4))


class OFD(nn.Module):
  cfg: object
  stages: tuple

  @nn.compact
  def __call__(self, student, teacher, batch, progress, train: bool = True):
    del progress
    tv = batch.get('teacher_variables')
    bns = teacher_bns(tv['params'], self.stages) if tv is not None else None
    n = len(self.stages)
    k = self.cfg.connector_kernel_size
    loss = 0.0
    for j, i in enumerate(self.stages):
      f_s = wide(student[f'preact_stage{i}'])
      f_t = jax.lax.stop_gradient(wide(teacher[f'preact_stage{i}']))
      c = f_t.shape[-1]
      conv = nn.Conv(c, (k, k), padding=(k - 1) // 2, use_bias=False, dtype=f_s.dtype,
                     kernel_init=nn.initializers.variance_scaling(2.0, 'fan_out', 'normal'),
                     name=f'connector{j}_conv')
      x = BatchNorm(use_running_average=not train, axis_name=batch.get('axis_name'),
                    name=f'connector{j}_bn')(conv(f_s))
      margin = (jnp.zeros((c,), jnp.float32) if bns is None
                else margins(bns[j]['scale'], bns[j]['bias']))
      target = _pool_to(f_t, x.shape[1:3])
      loss = loss + feat_loss(x, target, margin.astype(x.dtype)) / 2**(n - j - 1)
    return {'ofd': self.cfg.weight * loss}


def _build(cfg, ctx):
  s, t = _stages(ctx.student), _stages(ctx.teacher)
  if not s or not t:
    raise ValueError('OFD needs both models\' preact_stage features')
  if len(s) != len(t):
    # mdistiller indexes the margins from the teacher's first stage but aligns the
    # features to the last ones: only equal stage counts run there.
    raise ValueError(f'OFD needs as many stages in student ({len(s)}) and teacher ({len(t)})')
  for i in t:
    (_, hs, ws, _), (_, ht, wt, _) = ctx.student[f'preact_stage{i}'].shape, ctx.teacher[
        f'preact_stage{i}'].shape
    if ht % hs or wt % ws:
      raise ValueError(f'OFD pools the teacher to the student: stage {i} teacher {ht}x{wt} '
                       f'is not a multiple of student {hs}x{ws}')
  return OFD(cfg, tuple(t))


OFD_METHOD = methods.register(methods.Method(
    name='ofd', doc="Overhaul of feature distillation as mdistiller's OFD.py.",
    build=_build, ce_weight=lambda cfg: cfg.ce_weight, teacher_bn_mode='batch',
    fields={
        'weight': methods.Field(0.001, 'loss weight (cfg.py OFD.LOSS.FEAT_WEIGHT)',
                                methods.non_negative, 'a number >= 0'),
        'ce_weight': methods.Field(1.0, 'cross-entropy weight (cfg.py OFD.LOSS.CE_WEIGHT)',
                                   methods.non_negative, 'a number >= 0'),
        'connector_kernel_size': methods.Field(
            1, 'connector conv kernel (cfg.py OFD.CONNECTOR.KERNEL_SIZE)',
            lambda v: isinstance(v, int) and not isinstance(v, bool) and v % 2 == 1,
            'an odd integer'),
    }))
