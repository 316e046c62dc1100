"""Distillation methods: a registry of pure loss functions by name.

A method's loss maps (student, teacher, labels, kd_config) to a dict of named,
already weighted terms that are added to the cross-entropy. `student` and `teacher`
are the models' outputs as one dict: 'logits', 'stem', 'stage1', 'stage2',
'stage3', 'pooled'. Adding a method is one function and one `register` call.

The defaults reproduce the reference's code (hankyul2/KnowledgeDistillation @f019dfc):
- logit: MSE between the 64-d pooled features (the reference's "Logits" method;
  `kd.logit_target='logits'` regresses the real logits as Ba & Caruana do);
- st: Hinton's soft targets, T^2 * KL(teacher || student) at temperature T;
- at: attention transfer (Zagoruyko & Komodakis), beta * sum over stages of MSE;
- at_st: at + the st term weighted 0.9 (set in the at_st configs);
- fsp: flow-of-solution-procedure matrices (Yim et al.), trained in one stage.
"""
import dataclasses
from typing import Callable, Dict, Mapping, Tuple

import jax
import jax.numpy as jnp
import optax

Outputs = Mapping[str, jax.Array]
LossFn = Callable[[Outputs, Outputs, jax.Array, Mapping], Dict[str, jax.Array]]


@dataclasses.dataclass(frozen=True)
class Method:
  name: str
  loss: LossFn
  needs_teacher: bool = True


METHODS: Dict[str, Method] = {}


def register(name: str, loss: LossFn, needs_teacher: bool = True):
  METHODS[name] = Method(name, loss, needs_teacher)


def get_method(name: str) -> Method:
  if name not in METHODS:
    raise ValueError(f"unknown method {name!r}; expected one of: {', '.join(METHODS)}")
  return METHODS[name]


def wide(x):
  """Losses run in at least float32 even when the model computes in bfloat16."""
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def cross_entropy(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(wide(logits), labels).mean()


def ce_weight(method: str, kd_config: Mapping) -> float:
  """Cross-entropy weight: 1 as in the reference, 1 - alpha with Hinton's weighting."""
  alpha = kd_config.get('alpha')
  return 1.0 - alpha if alpha is not None and method in ('st', 'at_st') else 1.0


def mse(a, b):
  return jnp.mean(jnp.square(wide(a) - wide(b)))


def soft_target_kl(student_logits, teacher_logits, temperature):
  """T^2 * KL(softmax(t/T) || softmax(s/T)), summed over classes, mean over the batch."""
  log_p_s = jax.nn.log_softmax(wide(student_logits) / temperature)
  log_p_t = jax.nn.log_softmax(wide(teacher_logits) / temperature)
  kl = jnp.sum(jnp.exp(log_p_t) * (log_p_t - log_p_s), axis=-1)
  return temperature**2 * jnp.mean(kl)


def attention_map(features):
  """Per-example L2-normalised spatial map of the channel mean of squares."""
  a = jnp.mean(jnp.square(wide(features)), axis=-1).reshape(features.shape[0], -1)
  # F.normalize's eps: an all-zero map stays zero instead of becoming NaN.
  return a / jnp.maximum(jnp.linalg.norm(a, axis=-1, keepdims=True), 1e-12)


def fsp_matrix(f_in, f_out):
  """G = F_in^T F_out / (h*w) per example; F_in average-pooled to F_out's size."""
  f_in, f_out = wide(f_in), wide(f_out)
  n, h, w, c = f_in.shape
  ho, wo = f_out.shape[1:3]
  if (h, w) != (ho, wo):
    f_in = f_in.reshape(n, ho, h // ho, wo, w // wo, c).mean(axis=(2, 4))
  return jnp.einsum('nhwi,nhwo->nio', f_in, f_out) / (ho * wo)


AT_STAGES = ('stage1', 'stage2', 'stage3')
FSP_PAIRS = (('stem', 'stage1'), ('stage1', 'stage2'), ('stage2', 'stage3'))


def base_loss(student, teacher, labels, kd):
  del student, teacher, labels, kd
  return {}


def logit_loss(student, teacher, labels, kd):
  del labels
  target = kd.get('logit_target', 'pooled')
  return {'logit': kd.get('logit_weight', 1.0) * mse(student[target], teacher[target])}


def st_loss(student, teacher, labels, kd):
  del labels
  weight = kd['alpha'] if kd.get('alpha') is not None else kd.get('st_weight', 1.0)
  return {'st': weight * soft_target_kl(student['logits'], teacher['logits'],
                                        kd.get('temperature', 4.0))}


def at_loss(student, teacher, labels, kd):
  del labels
  total = sum(mse(attention_map(student[k]), attention_map(teacher[k])) for k in AT_STAGES)
  return {'at': kd.get('at_beta', 1000.0) * total}


def at_st_loss(student, teacher, labels, kd):
  return {**at_loss(student, teacher, labels, kd), **st_loss(student, teacher, labels, kd)}


def fsp_loss(student, teacher, labels, kd):
  del labels
  terms = [mse(fsp_matrix(student[a], student[b]), fsp_matrix(teacher[a], teacher[b]))
           for a, b in FSP_PAIRS]
  # The reference averages the three pair losses and divides by 3 once more.
  return {'fsp': kd.get('fsp_weight', 1.0) * sum(terms) / len(terms) / 3}


register('base', base_loss, needs_teacher=False)
register('logit', logit_loss)
register('st', st_loss)
register('at', at_loss)
register('at_st', at_st_loss)
register('fsp', fsp_loss)


def check_compatible(method: Method, student_shapes: Outputs, teacher_shapes: Outputs,
                     kd: Mapping) -> Tuple[str, ...]:
  """Traces the loss on shapes only; raises ValueError if it cannot compare them."""
  labels = jax.ShapeDtypeStruct(student_shapes['logits'].shape[:1], jnp.int32)
  try:
    out = jax.eval_shape(lambda s, t, y: method.loss(s, t, y, kd),
                         student_shapes, teacher_shapes, labels)
  except (TypeError, ValueError, KeyError) as e:
    detail = str(e).splitlines()[0] if str(e) else type(e).__name__
    raise ValueError(f'method {method.name!r} cannot compare these student and teacher '
                     f'outputs: {detail}') from None
  return tuple(out)
