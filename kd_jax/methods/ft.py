"""Factor transfer (Kim et al., NeurIPS 2018) as RepDistiller's distiller_zoo/FT.py.

A paraphraser (a conv autoencoder of the teacher's last stage, no BatchNorm) is first
trained alone to reconstruct that map (RepDistiller's 30-epoch init stage: `init_terms`);
then a translator (three conv + BatchNorm + LeakyReLU(0.1) layers on the student's last
stage) is trained with the student so that its "factor" matches the paraphraser
encoder's. As RepDistiller computes it, the factor is an AT-style map: the channel mean
of squares, L2-normalised over space (the larger map average-pooled to the smaller);
the term is `weight` x mean |factor_s - factor_t|.

The paraphraser is not trained in the main stage (RepDistiller optimises only the
translator there), so its weights live in the 'method_state' collection, never in
'params': the main stage neither moves nor weight-decays them; the init stage
(`init_epochs` > 0; RepDistiller: 30) trains them alone. With `init_epochs` 0 the
paraphraser stays random, so RepDistiller's FT needs the init stage.
"""
import flax.linen as nn
import jax.numpy as jnp

from kd_jax import methods
from kd_jax.methods import ab
from kd_jax.methods.ab import TorchConv
from kd_jax.methods.common import wide
from kd_jax.models import layers


def _leaky(x):
  return nn.leaky_relu(x, 0.1)


def factor(f):
  """F.normalize(mean_c f^2 as [B, HW]) with a norm whose gradient at 0 is 0."""
  a = jnp.mean(jnp.square(f), axis=-1).reshape(f.shape[0], -1)
  sq = jnp.sum(jnp.square(a), axis=-1, keepdims=True)
  safe = jnp.where(sq > 0, sq, 1.0)
  norm = jnp.where(sq > 0, jnp.sqrt(safe), 0.0)
  return a / jnp.maximum(norm, 1e-12)


def block_mean(x, size):
  n, h, w, c = x.shape
  return x.reshape(n, size, h // size, size, w // size, c).mean(axis=(2, 4))


class Paraphraser(nn.Module):
  """models/util.py Paraphraser(k=0.5, use_bn=False): encoder C->C->C/2->C/2, decoder
  (ConvTranspose2d 3/1/1) C/2->C/2->C->C, LeakyReLU(0.1) after every layer. Its
  variables go to 'method_state' (see the module docstring)."""
  channels: int

  def setup(self):
    c, half = self.channels, self.channels // 2
    # encoder<j>/decoder<j> are RepDistiller's encoder.<j>/decoder.<j> (j = 0, 3, 6).
    self.encoder = [TorchConv(o, (3, 3), padding=1, collection='method_state',
                              name=f'encoder{j}')
                    for j, o in zip((0, 3, 6), (c, half, half))]
    self.decoder = [TorchConv(o, (3, 3), padding=1, transpose=True, collection='method_state',
                              name=f'decoder{j}')
                    for j, o in zip((0, 3, 6), (half, c, c))]

  def encode(self, x):
    for conv in self.encoder:
      x = _leaky(conv(x))
    return x

  def __call__(self, x):
    x = self.encode(x)
    for conv in self.decoder:
      x = _leaky(conv(x))
    return x


class FT(nn.Module):
  cfg: object
  t_channels: int

  @nn.compact
  def _run(self, student, teacher, batch, train, init_stage):
    t = wide(teacher[_last(teacher)])
    para = Paraphraser(self.t_channels, name='paraphraser')
    if init_stage or self.is_initializing():  # init creates the decoder's variables too
      rec = para(t)
    if init_stage:
      return {'ft_reconstruction': jnp.mean(jnp.square(rec - t))}
    s = wide(student[_last(student)])
    half = self.t_channels // 2
    axis_name = batch.get('axis_name')
    x = s
    for j, o in zip((0, 3, 6), (s.shape[-1], half, half)):
      # translator<j>/translator_bn<j+1>: RepDistiller's translator.encoder.<j>/<j+1>.
      x = TorchConv(o, (3, 3), padding=1, name=f'translator{j}')(x)
      x = layers.BatchNorm(use_running_average=not train, axis_name=axis_name,
                           name=f'translator_bn{j + 1}')(x)
      x = _leaky(x)
    f_s, f_t = x, para.encode(t)
    if f_s.shape[1] > f_t.shape[1]:
      f_s = block_mean(f_s, f_t.shape[1])
    elif f_s.shape[1] < f_t.shape[1]:
      f_t = block_mean(f_t, f_s.shape[1])
    return {'ft': self.cfg.weight * jnp.mean(jnp.abs(factor(f_s) - factor(f_t)))}

  def __call__(self, student, teacher, batch, progress, train: bool = True):
    del progress
    return self._run(student, teacher, batch, train, False)

  def init_terms(self, student, teacher, batch, progress, train: bool = True):
    """RepDistiller's init stage: the paraphraser's reconstruction MSE of the teacher's
    last stage (trains method_state['paraphraser'] only)."""
    del progress
    return self._run(student, teacher, batch, train, True)


def _last(outputs):
  return max((k for k in outputs if k.startswith('stage') and k[5:].isdigit()),
             key=lambda k: int(k[5:]))


def _build(cfg, ctx):
  return FT(cfg, ctx.teacher[_last(ctx.teacher)].shape[-1])


def from_torch(state_dict):
  """RepDistiller's 'translator.encoder.*' and 'paraphraser.*' entries as this module's
  variables {'params', 'batch_stats', 'method_state'} (kernels HWIO)."""
  out = {'params': {}, 'batch_stats': {}, 'method_state': {'paraphraser': {}}}
  for key, value in state_dict.items():
    owner, part, j, what = key.split('.')
    if what == 'num_batches_tracked':
      continue
    if owner == 'paraphraser':
      value = ab.torch_kernel(value, part == 'decoder') if what == 'weight' else value
      what = 'kernel' if what == 'weight' else what
      out['method_state']['paraphraser'].setdefault(f'{part}{j}', {})[what] = value
    elif value.ndim == 4 or (what == 'bias' and int(j) % 3 == 0):  # translator conv
      value = ab.torch_kernel(value, False) if what == 'weight' else value
      out['params'].setdefault(f'translator{j}', {})['kernel' if what == 'weight' else what] = value
    elif what in ('running_mean', 'running_var'):
      out['batch_stats'].setdefault(f'translator_bn{j}', {})[what[8:]] = value
    else:
      out['params'].setdefault(f'translator_bn{j}', {})['scale' if what == 'weight' else what] = value
  return out


def to_torch_key(path):
  """The state_dict key of a variable path (inverse of from_torch)."""
  if path[0] == 'paraphraser':
    _, module, what = path
    return f'paraphraser.{module[:7]}.{module[7:]}.{"weight" if what == "kernel" else what}'
  module, what = path
  j = module.rsplit('bn', 1)[-1] if module.startswith('translator_bn') else module[10:]
  what = {'kernel': 'weight', 'scale': 'weight', 'mean': 'running_mean',
          'var': 'running_var'}.get(what, what)
  return f'translator.encoder.{j}.{what}'


FT_METHOD = methods.register(methods.Method(
    name='ft', doc="Factor transfer (Kim et al., NeurIPS 2018) as RepDistiller's FT.py "
    '(main stage; `init_terms` is the paraphraser\'s init stage).',
    build=_build, init_stage='method_state:paraphraser',
    fields={
        'weight': methods.Field(200.0, "beta (RepDistiller's run_cifar_distill.sh: -b 200)",
                                methods.non_negative, 'a number >= 0'),
        **methods.init_stage_fields(30),
    }))
