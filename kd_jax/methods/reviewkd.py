"""ReviewKD (Chen et al., CVPR 2021) as mdistiller's ReviewKD.py.

The student's stages and pooled feature are fused from the deepest level down by
attention-based fusion (ABF) modules and each fused map is compared to the teacher's
pre-activation map of the same level by the hierarchical context loss (HCL). Channels
and sizes are read from the models' output shapes, as mdistiller's config lists them
for its standard pairs: in = the student's widths (stages, then pooled), out = the
teacher's, shapes / out_shapes = the student's / teacher's spatial sizes from the
deepest level up (the pooled level is 1), mid = min(max_mid_channel, in[-1]).
"""
import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from kd_jax import methods
from kd_jax.methods.common import wide
from kd_jax.models import layers


def nearest(x, size: int):
  """torch F.interpolate(mode='nearest') of NHWC `x` to size x size: source index
  floor(dst * in / out) with the scale in float32, as PyTorch's CPU kernel computes it."""
  def index(n):
    scale = np.float32(n / size)
    return np.minimum(np.floor(np.arange(size, dtype=np.float32) * scale).astype(np.int64), n - 1)
  h, w = x.shape[1:3]
  if (h, w) == (size, size):
    return x
  return x[:, index(h)][:, :, index(w)]


def block_mean(x, size: int):
  """adaptive_avg_pool2d to size x size when it divides the map (the plain block mean)."""
  n, h, w, c = x.shape
  return x.reshape(n, size, h // size, size, w // size, c).mean(axis=(2, 4))


def hcl(student, teacher):
  """Hierarchical context loss of one level: MSE plus the MSEs of 4x4, 2x2, 1x1 means
  (those smaller than the map) weighted 1/2, 1/4, 1/8, normalised by the weights' sum."""
  sq = lambda a, b: jnp.mean(jnp.square(a - b))
  loss, weight, total = sq(student, teacher), 1.0, 1.0
  for size in (4, 2, 1):
    if size >= student.shape[1]:
      continue
    weight /= 2
    loss = loss + weight * sq(block_mean(student, size), block_mean(teacher, size))
    total += weight
  return loss / total


# kaiming_uniform(a=1), mdistiller's ABF init of its two convolutions.
_abf_init = nn.initializers.variance_scaling(1.0, 'fan_in', 'uniform')
# PyTorch's default Conv2d weight init (kaiming_uniform(a=sqrt(5))).
_torch_conv_init = nn.initializers.variance_scaling(1 / 3, 'fan_in', 'uniform')


class ABF(nn.Module):
  """Attention-based fusion: 1x1 conv + BN, optional attention-weighted fusion with the
  deeper level's residual, nearest resize to out_shape, 3x3 conv + BN. Returns
  (output, residual for the next level)."""
  mid_channels: int
  out_channels: int
  fuse: bool
  axis_name: object = None

  @nn.compact
  def __call__(self, x, residual, shape: int, out_shape: int, train: bool):
    conv = lambda f, k, name: nn.Conv(f, (k, k), padding=k // 2, use_bias=False, name=name,
                                      kernel_init=_abf_init,
                                      conv_general_dilated=layers.nhwc_conv)
    norm = lambda name: layers.BatchNorm(use_running_average=not train,
                                         axis_name=self.axis_name, name=name)
    x = norm('bn1')(conv(self.mid_channels, 1, 'conv1')(x))
    if self.fuse:
      y = nearest(residual, shape)
      fan_in = 2 * self.mid_channels
      z = nn.Conv(2, (1, 1), padding=0, kernel_init=_torch_conv_init, name='att_conv',
                  bias_init=layers.torch_linear_bias_init(fan_in),
                  conv_general_dilated=layers.nhwc_conv)(jnp.concatenate([x, y], axis=-1))
      z = nn.sigmoid(z)
      x = x * z[..., :1] + y * z[..., 1:]
    if x.shape[2] != out_shape:
      x = nearest(x, out_shape)
    return norm('bn2')(conv(self.out_channels, 3, 'conv2')(x)), x


def _levels(outputs, prefix):
  names = sorted((k for k in outputs if k.startswith(prefix) and k[len(prefix):].isdigit()),
                 key=lambda k: int(k[len(prefix):]))
  if not names:
    raise KeyError(f'no {prefix}<i> features')
  return names


def layout(ctx: methods.Context, max_mid_channel: int):
  """mdistiller's (in_channels, out_channels, shapes, out_shapes, mid) for this pair, in
  its order: levels from the shallowest stage to pooled for the channels, shapes from the
  pooled level (1) to the shallowest stage."""
  s, t = ctx.student, ctx.teacher
  s_names, t_names = _levels(s, 'stage'), _levels(t, 'preact_stage')
  if len(s_names) != len(t_names):
    raise ValueError(f'reviewkd pairs stages one to one: the student has {len(s_names)}, '
                     f'the teacher {len(t_names)}')
  in_channels = [s[k].shape[-1] for k in s_names] + [s['pooled'].shape[-1]]
  out_channels = [t[k].shape[-1] for k in t_names] + [t['pooled'].shape[-1]]
  shapes = [1] + [s[k].shape[1] for k in reversed(s_names)]
  out_shapes = [1] + [t[k].shape[1] for k in reversed(t_names)]
  return in_channels, out_channels, shapes, out_shapes, min(max_mid_channel, in_channels[-1])


class ReviewKD(nn.Module):
  cfg: object
  in_channels: tuple
  out_channels: tuple
  shapes: tuple
  out_shapes: tuple
  mid_channels: int

  @nn.compact
  def __call__(self, student, teacher, batch, progress, train: bool = True):
    s_names = _levels(student, 'stage')
    t_names = _levels(teacher, 'preact_stage')
    # Deepest first: pooled, then the stages from the last one up.
    xs = [wide(student['pooled'])[:, None, None, :]] + [wide(student[k]) for k in
                                                          reversed(s_names)]
    n = len(xs)
    outs, residual = [], None
    for k, x in enumerate(xs):
      # abf<k> is mdistiller's abfs.<k> (its list is reversed to processing order).
      level = n - 1 - k  # index into the shallow-to-deep channel lists
      abf = ABF(self.mid_channels, self.out_channels[level], fuse=k > 0,
                axis_name=batch.get('axis_name'), name=f'abf{k}')
      out, residual = abf(x, residual, self.shapes[k], self.out_shapes[k], train)
      outs.append(out)
    targets = [wide(teacher['pooled'])[:, None, None, :]] + [wide(teacher[k]) for k in
                                                              reversed(t_names)]
    loss = sum(hcl(o, t) for o, t in zip(outs, targets))
    epoch = jnp.asarray(progress['epoch'], loss.dtype)
    warmup = jnp.minimum(epoch / self.cfg.warmup_epochs, 1.0)
    return {'reviewkd': self.cfg.weight * warmup * loss}


def _build(cfg, ctx):
  in_c, out_c, shapes, out_shapes, mid = layout(ctx, cfg.max_mid_channel)
  return ReviewKD(cfg, tuple(in_c), tuple(out_c), tuple(shapes), tuple(out_shapes), mid)


def from_torch(state_dict):
  """mdistiller's ReviewKD state_dict entries ('abfs.<k>....') as this module's variables
  {'params', 'batch_stats'} (numpy; conv kernels to HWIO)."""
  params, stats = {}, {}
  names = {'conv1.0': 'conv1', 'conv1.1': 'bn1', 'conv2.0': 'conv2', 'conv2.1': 'bn2',
           'att_conv.0': 'att_conv'}
  leaf = {'running_mean': 'mean', 'running_var': 'var'}
  for key, value in state_dict.items():
    if not key.startswith('abfs.') or key.endswith('num_batches_tracked'):
      continue
    _, k, a, b, what = key.split('.')
    module = names[f'{a}.{b}']
    value = np.asarray(value)
    if what in leaf:
      stats.setdefault(f'abf{k}', {}).setdefault(module, {})[leaf[what]] = value
      continue
    if what == 'weight':
      what, value = ('kernel', value.transpose(2, 3, 1, 0)) if value.ndim == 4 else ('scale',
                                                                                     value)
    params.setdefault(f'abf{k}', {}).setdefault(module, {})[what] = value
  return {'params': params, 'batch_stats': stats}


def to_torch_key(path):
  """The state_dict key of a variable path ('abf<k>', module, leaf) (inverse of from_torch)."""
  k, module, what = path
  names = {'conv1': 'conv1.0', 'bn1': 'conv1.1', 'conv2': 'conv2.0', 'bn2': 'conv2.1',
           'att_conv': 'att_conv.0'}
  what = {'kernel': 'weight', 'scale': 'weight', 'mean': 'running_mean',
          'var': 'running_var'}.get(what, what)
  return f'abfs.{k[3:]}.{names[module]}.{what}'


REVIEWKD = methods.register(methods.Method(
    name='reviewkd', doc="Review KD (Chen et al., CVPR 2021) as mdistiller's ReviewKD.py.",
    build=_build, ce_weight=lambda cfg: cfg.ce_weight,
    fields={
        'weight': methods.Field(5.0, 'HCL weight (configs/cifar100/reviewkd.yaml '
                                'REVIEWKD_WEIGHT 5.0, the standard recipe; engine/cfg.py '
                                'default 1.0)', methods.non_negative, 'a number >= 0'),
        'warmup_epochs': methods.Field(20, 'epochs of linear warm-up min(epoch / n, 1), '
                                       '1-based (engine/cfg.py WARMUP_EPOCHS)',
                                       methods.positive, 'a number > 0'),
        'max_mid_channel': methods.Field(512, "cap of the ABFs' middle width (engine/cfg.py "
                                         'MAX_MID_CHANNEL)',
                                         lambda v: isinstance(v, int) and v > 0,
                                         'an integer > 0'),
        'ce_weight': methods.Field(1.0, 'cross-entropy weight (engine/cfg.py CE_WEIGHT)',
                                   methods.non_negative, 'a number >= 0'),
    }))
