"""`crd`: contrastive representation distillation (Tian et al., ICLR 2020) as mdistiller
codes it (distillers/CRD.py; RepDistiller's crd/ is the same code).

- Both pooled features go through a trained embedding, Linear to feat_dim then divided
  by its L2 norm (no eps): v_s = embed_s(f_s), v_t = embed_t(f_t).
- Two memory banks of the training split, [train_size, feat_dim], in 'method_state':
  memory_s (the students' embeddings) and memory_t (the teacher's), initialised
  U(-1/sqrt(feat_dim/3), +) (not unit rows, as the original).
- Each example is scored against K + 1 rows: its own (column 0) and K negatives:
  s-anchor scores exp(memory_t[idx] . v_s / T), t-anchor exp(memory_s[idx] . v_t / T),
  the memory rows without gradient. Z (per anchor) is fixed on the first step from that
  step's scores, mean * train_size, then kept in 'method_state'.
- NCE loss per anchor, m = K, Pn = 1/train_size: -(sum_b log(x0 / (x0 + m Pn + 1e-7)) +
  sum_{b,k} log(m Pn / (xk + m Pn + 1e-7))) / B; loss = weight (s + t).
- After the scores, memory rows of the batch move: normalize(momentum m + (1 - momentum)
  v) (this step's scores use the memory before the update).

Negatives: mdistiller's dataset draws K indices of examples of other classes
(CIFAR100InstanceSample, mode 'exact', without replacement). kd_jax draws them inside the
step from the step's key folded with each example's dataset index (so they do not depend
on the device count), uniformly over the split and with replacement, then redraws (up to
`redraws` times) any that hit the anchor's class according to 'method_state' labels:
the training labels when the run gives them at init (train.py does), else those seen so
far. With 100 classes a same-class negative survives with probability about 1e-2 ^
(redraws + 1). A batch may pass its own 'contrast_idx' [B, K + 1] (the parity tests).

Data parallel (batch['axis_name']): Z is the mean over the global batch and the memory
update gathers every device's indices and embeddings, so Z and the banks are the same on
every device and equal to one device's on the whole batch.
Defaults: mdistiller engine/cfg.py CRD (feat_dim 128, K 16384, T 0.07 (stored as float32
in the original: float32(0.07) is used), momentum 0.5, feat weight 0.8, CE 1).
"""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from kd_jax import methods
from kd_jax.methods.cc import LinearEmbed
from kd_jax.methods.common import wide

_T_AS_FLOAT32 = float(jnp.float32(0.07))


def _normalize(x):
  return x / jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))


def nce_loss(x, train_size):
  """ContrastLoss of scores x [B, K + 1] (column 0 positive)."""
  batch, k = x.shape[0], x.shape[1] - 1
  m_pn = k / train_size
  positive = jnp.sum(jnp.log(x[:, 0] / (x[:, 0] + m_pn + 1e-7)))
  negative = jnp.sum(jnp.log(m_pn / (x[:, 1:] + m_pn + 1e-7)))
  return -(positive + negative) / batch


def sample_contrast_idx(key, index, labels, table, num_negatives, train_size, redraws):
  """[B, K + 1]: each example's own index, then K indices of (probably) other classes."""
  def one(i, label):
    k = jax.random.fold_in(key, i)
    draw = lambda r: jax.random.randint(jax.random.fold_in(k, r), (num_negatives,), 0,
                                        train_size)
    idx = draw(0)
    for r in range(1, redraws + 1):
      idx = jnp.where(table[idx] == label, draw(r), idx)
    return jnp.concatenate([i[None], idx])
  return jax.vmap(one)(index, labels)


class CRD(nn.Module):
  cfg: object
  train_size: int

  @nn.compact
  def __call__(self, student, teacher, batch, progress, train: bool = True):
    del progress
    cfg, n = self.cfg, self.train_size
    v_s = _normalize(LinearEmbed(cfg.feat_dim, name='embed_s')(wide(student['pooled'])))
    v_t = _normalize(LinearEmbed(cfg.feat_dim, name='embed_t')(
        jax.lax.stop_gradient(wide(teacher['pooled']))))
    stdv = 1.0 / math.sqrt(cfg.feat_dim / 3)
    bank = lambda: jax.random.uniform(self.make_rng('state'), (n, cfg.feat_dim), jnp.float32,
                                      -stdv, stdv)
    memory_s = self.variable('method_state', 'memory_s', bank)
    memory_t = self.variable('method_state', 'memory_t', bank)
    z = self.variable('method_state', 'z', lambda: jnp.full((2,), -1.0, jnp.float32))
    given = batch.get('train_labels')
    labels_table = self.variable(
        'method_state', 'labels',
        lambda: (jnp.asarray(given, jnp.int32) if given is not None
                 else jnp.full((n,), -1, jnp.int32)))
    index, labels = batch['index'], batch['label']
    idx = batch.get('contrast_idx')
    if idx is None:
      idx = sample_contrast_idx(batch['key'], index, labels, labels_table.value,
                                cfg.num_negatives, n, cfg.redraws)
    temperature = jnp.asarray(_T_AS_FLOAT32 if cfg.temperature == 0.07 else cfg.temperature,
                              v_s.dtype)
    rows = lambda memory: jax.lax.stop_gradient(memory.value[idx].astype(v_s.dtype))
    out_s = jnp.exp(jnp.einsum('bkd,bd->bk', rows(memory_t), v_s) / temperature)
    out_t = jnp.exp(jnp.einsum('bkd,bd->bk', rows(memory_s), v_t) / temperature)
    first = jax.lax.stop_gradient(jnp.stack([jnp.mean(out_s), jnp.mean(out_t)]) * n)
    axis = batch.get('axis_name')
    if axis is not None:  # Z of the global batch, the same on every device
      first = jax.lax.pmean(first, axis)
    z_used = jnp.where(z.value < 0, first, z.value.astype(first.dtype))
    loss = cfg.weight * (nce_loss(out_s / z_used[0], n) + nce_loss(out_t / z_used[1], n))
    if train and not self.is_initializing():
      z.value = z_used.astype(z.value.dtype)
      gather = ((lambda x: jax.lax.all_gather(x, axis, tiled=True)) if axis is not None
                else (lambda x: x))
      all_index, all_labels = gather(index), gather(labels)
      m = cfg.momentum
      for memory, v in ((memory_s, gather(v_s)), (memory_t, gather(v_t))):
        v = jax.lax.stop_gradient(v)
        moved = _normalize(memory.value[all_index].astype(v.dtype) * m + v * (1 - m))
        memory.value = memory.value.at[all_index].set(moved.astype(memory.value.dtype))
      labels_table.value = labels_table.value.at[all_index].set(all_labels)
    return {'crd': loss}


def _positive_int(v):
  return isinstance(v, int) and not isinstance(v, bool) and v > 0


CRD_METHOD = methods.register(methods.Method(
    name='crd', doc="Contrastive representation distillation as mdistiller's CRD.py.",
    build=lambda cfg, ctx: CRD(cfg, ctx.train_size), ce_weight=lambda cfg: cfg.ce_weight,
    needs_labels=True,
    fields={
        'feat_dim': methods.Field(128, 'embedding width (engine/cfg.py CRD.FEAT.DIM)',
                                  _positive_int, 'an integer > 0'),
        'num_negatives': methods.Field(16384, 'K, negatives per example (CRD.NCE.K)',
                                       _positive_int, 'an integer > 0'),
        'temperature': methods.Field(0.07, 'NCE temperature (CRD.NCE.TEMPERATURE; 0.07 is '
                                     'used as float32, as the original stores it)',
                                     methods.positive, 'a number > 0'),
        'momentum': methods.Field(0.5, 'memory momentum (CRD.NCE.MOMENTUM)',
                                  lambda v: methods.non_negative(v) and v <= 1,
                                  'a number in [0, 1]'),
        'weight': methods.Field(0.8, 'loss weight (CRD.LOSS.FEAT_WEIGHT)', methods.non_negative,
                                'a number >= 0'),
        'ce_weight': methods.Field(1.0, 'cross-entropy weight (CRD.LOSS.CE_WEIGHT)',
                                   methods.non_negative, 'a number >= 0'),
        'redraws': methods.Field(3, "redraws of a negative of the anchor's class (kd_jax's "
                                 'sampler; see the module docstring)',
                                 lambda v: isinstance(v, int) and not isinstance(v, bool)
                                 and v >= 0, 'an integer >= 0'),
    }))
