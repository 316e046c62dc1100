"""Activation boundaries (Heo et al., AAAI 2019) as RepDistiller's distiller_zoo/AB.py.

Each student pre-activation stage, through a connector (identity when channels and size
match the teacher's, else RepDistiller's ConvReg without ReLU: a conv + BatchNorm), is
pushed to the teacher's side of the activation boundary with margin 1; stage i of n is
weighted 2^(i - n + 1) and every term is divided by the batch and by 1000 / 3.

Two stages in RepDistiller: this loss alone trains the connector and the student's
feature layers for 30 epochs (the init stage, `init_terms`), then the main stage is plain
cross-entropy. kd_jax's default (`init_epochs` 0) instead trains `weight` x the loss
jointly with the cross-entropy in one stage, as mdistiller trains all its methods;
RepDistiller's schedule is `init_epochs` 30 and `weight` 0 (configs/cifar100_standard.py).
"""
import flax.linen as nn
import jax
import jax.numpy as jnp

from kd_jax import methods
from kd_jax.methods.common import wide
from kd_jax.models import layers

# PyTorch's default Conv2d / ConvTranspose2d weight init (kaiming_uniform(a=sqrt(5))).
torch_conv_init = nn.initializers.variance_scaling(1 / 3, 'fan_in', 'uniform')


class TorchConv(nn.Module):
  """torch.nn.Conv2d (transpose=False) or ConvTranspose2d (transpose=True) with bias, NHWC.
  The kernel is [kh, kw, in, out] in both cases: the torch weight transposed (OIHW ->
  HWIO, or IOHW -> HWIO); the transposed conv is the dilated conv with the kernel
  flipped, which is what PyTorch computes."""
  features: int
  kernel: tuple
  stride: int = 1
  padding: int = 0
  transpose: bool = False
  collection: str = 'params'  # 'method_state' for weights the main stage must not train

  def _var(self, name, init, shape):
    if self.collection == 'params':
      return self.param(name, init, shape)
    return self.variable(self.collection, name, lambda: init(self.make_rng('params'), shape)).value

  @nn.compact
  def __call__(self, x):
    cin = x.shape[-1]
    kh, kw = self.kernel
    # PyTorch's fan_in: in-channels x kernel for Conv2d, out-channels x kernel (its dim 1)
    # for ConvTranspose2d.
    fan_in = (self.features if self.transpose else cin) * kh * kw
    init = lambda key, shape, dtype=jnp.float32: jax.random.uniform(
        key, shape, dtype, -1.0, 1.0) / jnp.sqrt(fan_in).astype(dtype)
    w = self._var('kernel', init, (kh, kw, cin, self.features))
    b = self._var('bias', layers.torch_linear_bias_init(fan_in), (self.features,))
    w, b = w.astype(x.dtype), b.astype(x.dtype)
    dn = ('NHWC', 'HWIO', 'NHWC')
    if self.transpose:
      pad = [(kh - 1 - self.padding,) * 2, (kw - 1 - self.padding,) * 2]
      y = jax.lax.conv_general_dilated(x, w[::-1, ::-1], (1, 1), pad,
                                       lhs_dilation=(self.stride, self.stride),
                                       dimension_numbers=dn,
                                       precision=jax.lax.Precision.HIGHEST)
    else:
      y = jax.lax.conv_general_dilated(x, w, (self.stride, self.stride),
                                       [(self.padding,) * 2] * 2, dimension_numbers=dn,
                                       precision=jax.lax.Precision.HIGHEST)
    return y + b


def conv_reg(s_shape, t_shape, name=None):
  """RepDistiller's ConvReg conv (models/util.py ConvReg) for NHWC shapes [B, H, W, C]."""
  s_h, s_w, t_h, t_w, t_c = s_shape[1], s_shape[2], t_shape[1], t_shape[2], t_shape[3]
  if s_h == 2 * t_h:
    return TorchConv(t_c, (3, 3), stride=2, padding=1, name=name)
  if 2 * s_h == t_h:
    return TorchConv(t_c, (4, 4), stride=2, padding=1, transpose=True, name=name)
  if s_h >= t_h:
    return TorchConv(t_c, (1 + s_h - t_h, 1 + s_w - t_w), name=name)
  raise ValueError(f'no ConvReg from a {s_h}x{s_w} map to a {t_h}x{t_w} one (RepDistiller '
                   'has none either)')


def boundary_loss(s, t, margin):
  """sum |(s + m)^2 [s > -m, t <= 0] + (s - m)^2 [s <= m, t > 0]| (AB.py's criterion)."""
  neg = jnp.where((s > -margin) & (t <= 0), jnp.square(s + margin), 0.0)
  pos = jnp.where((s <= margin) & (t > 0), jnp.square(s - margin), 0.0)
  return jnp.sum(jnp.abs(neg + pos))


def _stages(outputs):
  names = sorted((k for k in outputs if k.startswith('preact_stage')), key=lambda k: int(k[12:]))
  if not names:
    raise KeyError('no preact_stage<i> features')
  return names


class AB(nn.Module):
  cfg: object

  @nn.compact  # the one compact method: both stages' entry points call it
  def _terms(self, student, teacher, batch, train):
    names = _stages(student)
    if len(names) != len(_stages(teacher)):
      raise ValueError('ab pairs stages one to one')
    n = len(names)
    terms = {}
    for i, name in enumerate(names):
      s, t = wide(student[name]), wide(teacher[name])
      if s.shape[1:] != t.shape[1:]:
        # connector<i> is RepDistiller's connector.connectors.<i>.
        s = _Connector(tuple(t.shape), batch.get('axis_name'), name=f'connector{i}')(s, train)
      weight = 2.0 ** (i - n + 1)
      terms[f'ab_stage{i + 1}'] = (weight * boundary_loss(s, t, self.cfg.margin)
                                   / s.shape[0] / 1000 * 3)
    return terms

  def __call__(self, student, teacher, batch, progress, train: bool = True):
    del progress
    return {'ab': self.cfg.weight * sum(self._terms(student, teacher, batch, train).values())}

  def init_terms(self, student, teacher, batch, progress, train: bool = True):
    """RepDistiller's init-stage terms (their sum is what it trains), unweighted."""
    del progress
    return self._terms(student, teacher, batch, train)


class _Connector(nn.Module):
  """ConvReg(use_relu=False): the conv, then BatchNorm (train mode in both stages)."""
  t_shape: tuple
  axis_name: object = None

  @nn.compact
  def __call__(self, x, train):
    x = conv_reg(x.shape, self.t_shape, name='conv')(x)
    return layers.BatchNorm(use_running_average=not train, axis_name=self.axis_name,
                            name='bn')(x)


AB_METHOD = methods.register(methods.Method(
    name='ab', doc="Activation boundaries (Heo et al., AAAI 2019) as RepDistiller's AB.py, "
    'trained jointly with CE, or after its init stage (`init_epochs`) as RepDistiller.',
    build=lambda cfg, ctx: AB(cfg), init_stage='student_features+method_params',
    fields={
        'weight': methods.Field(1.0, "weight of the summed stage terms in the joint form "
                                "(RepDistiller's init stage trains their plain sum)",
                                methods.non_negative, 'a number >= 0'),
        'margin': methods.Field(1.0, 'activation-boundary margin (AB.py: 1.0)',
                                methods.positive, 'a number > 0'),
        **methods.init_stage_fields(30),
    }))


def torch_kernel(weight, transpose: bool):
  """A torch conv weight (OIHW, or IOHW for ConvTranspose2d) as TorchConv's HWIO kernel."""
  return weight.transpose(2, 3, 0, 1) if transpose else weight.transpose(2, 3, 1, 0)


def from_torch(state_dict, transposed=()):
  """RepDistiller's Connector entries ('connector.connectors.<i>.conv|bn.*') as this
  module's variables; `transposed`: the indices i whose conv is a ConvTranspose2d."""
  params, stats = {}, {}
  for key, value in state_dict.items():
    parts = key.split('.')
    i, module, what = parts[-3], parts[-2], parts[-1]
    name = f'connector{i}'
    if what == 'num_batches_tracked':
      continue
    if what in ('running_mean', 'running_var'):
      stats.setdefault(name, {}).setdefault(module, {})[what[8:]] = value
    elif module == 'conv' and what == 'weight':
      params.setdefault(name, {}).setdefault(module, {})['kernel'] = torch_kernel(
          value, int(i) in transposed)
    else:
      what = 'scale' if (module == 'bn' and what == 'weight') else what
      params.setdefault(name, {}).setdefault(module, {})[what] = value
  return {'params': params, 'batch_stats': stats}
