"""`cc`: correlation congruence (Peng et al., ICCV 2019) as RepDistiller codes it
(distiller_zoo/CC.py, LinearEmbed in models/util.py; mdistiller has no CC). Both pooled
features go through a trained linear embedding (embed_s, embed_t: Linear to feat_dim,
no normalisation, both optimised with the student, train_student.py:211-218);
d = |embed_s(f_s) - embed_t(f_t)| and loss = mean over i < B - 1 of sum_k d[i, k]
d[i + 1, k]: products of consecutive examples, so it depends on the batch order (this is
RepDistiller's restructuring, not the paper's kernel). Times weight: `-b 0.02` in
scripts/run_cifar_distill.sh, CE weight 1 (gamma), feat_dim 128.
Variables: params embed_s/linear, embed_t/linear as the original's state_dict names them.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp

from kd_jax import methods
from kd_jax.methods import feature
from kd_jax.methods.common import wide
from kd_jax.models import layers


class LinearEmbed(nn.Module):
  """RepDistiller's LinearEmbed: flatten, Linear with PyTorch's default initialisation."""
  features: int

  @nn.compact
  def __call__(self, x):
    x = x.reshape(x.shape[0], -1)
    return nn.Dense(self.features, kernel_init=feature.torch_default_init,
                    bias_init=layers.torch_linear_bias_init(x.shape[-1]), name='linear')(x)


def cc_loss(e_s, e_t):
  d = jnp.abs(e_s - e_t)
  return jnp.mean(jnp.sum(d[:-1] * d[1:], axis=1))


class CC(nn.Module):
  cfg: object

  @nn.compact
  def __call__(self, student, teacher, batch, progress, train: bool = True):
    del batch, progress, train
    e_s = LinearEmbed(self.cfg.feat_dim, name='embed_s')(wide(student['pooled']))
    e_t = LinearEmbed(self.cfg.feat_dim, name='embed_t')(
        jax.lax.stop_gradient(wide(teacher['pooled'])))
    return {'cc': self.cfg.weight * cc_loss(e_s, e_t)}


CC_METHOD = methods.register(methods.Method(
    name='cc', doc="Correlation congruence as RepDistiller's CC.py (consecutive examples).",
    build=lambda cfg, ctx: CC(cfg), ce_weight=lambda cfg: cfg.ce_weight,
    fields={
        'weight': methods.Field(0.02, 'loss weight (RepDistiller -b, run_cifar_distill.sh)',
                                methods.non_negative, 'a number >= 0'),
        'feat_dim': methods.Field(128, 'embedding width (train_student.py --feat_dim)',
                                  lambda v: isinstance(v, int) and not isinstance(v, bool)
                                  and v > 0, 'an integer > 0'),
        'ce_weight': methods.Field(1.0, 'cross-entropy weight (RepDistiller -r, gamma)',
                                   methods.non_negative, 'a number >= 0'),
    }))
