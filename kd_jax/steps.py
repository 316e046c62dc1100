"""Train state, optimizer and the jit-able train and eval steps (no TensorFlow here).

One train step serves every method: the teacher forward, the student forward and
backward, cross-entropy and the distillation terms are one XLA program. `base` has
no teacher term, so its step never runs the teacher.
"""
import functools
from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct
from flax.training import train_state

from kd_jax import device_data, distill


class TrainState(train_state.TrainState):
  batch_stats: Any = None


def lr_schedule(base_lr: float, steps_per_epoch: int, boundary_epochs: Sequence[int],
                decay: float) -> optax.Schedule:
  """PyTorch MultiStepLR stepped per epoch: lr * decay^k after each boundary epoch."""
  return optax.piecewise_constant_schedule(
      base_lr, {int(e) * steps_per_epoch: decay for e in boundary_epochs})


def create_optimizer(schedule: optax.Schedule, momentum: float, weight_decay: float,
                     nesterov: bool = False) -> optax.GradientTransformation:
  """torch.optim.SGD: weight decay added to the gradient of every parameter
  (BatchNorm and biases included) before momentum; first momentum buffer = gradient."""
  return optax.chain(optax.add_decayed_weights(weight_decay),
                     optax.sgd(schedule, momentum=momentum, nesterov=nesterov))


def create_train_state(model: nn.Module, variables: Mapping, tx) -> TrainState:
  return TrainState.create(apply_fn=model.apply, params=variables['params'],
                           batch_stats=variables['batch_stats'], tx=tx)


@struct.dataclass
class Teacher:
  """What the train step needs of a frozen teacher: its model (static), its variables
  (passed in as data, never part of the optimised state) and its BatchNorm mode."""
  model: nn.Module = struct.field(pytree_node=False)
  variables: Any = None
  batch_stats_mode: bool = struct.field(pytree_node=False, default=True)

  def __call__(self, images):
    variables = jax.lax.stop_gradient(self.variables)
    if self.batch_stats_mode:
      # As the reference, normalise with the batch's statistics; the running averages
      # this would update are dropped, so the teacher's variables never change.
      (logits, features), _ = self.model.apply(variables, images, train=True,
                                               mutable=['batch_stats'])
    else:
      logits, features = self.model.apply(variables, images, train=False)
    return {**features, 'logits': logits}


def _accuracy(logits, labels):
  return jnp.mean(jnp.argmax(logits, -1) == labels)


def train_step(state: TrainState, batch: Mapping[str, jax.Array], teacher: Optional[Teacher],
               *, model: nn.Module, method: distill.Method, kd_config: Mapping,
               skip_nonfinite: bool = False, axis_name: Optional[str] = None):
  """One SGD step on the student; returns (new state, metrics).

  With `axis_name` (inside pmap), gradients, metrics and BatchNorm statistics are
  averaged over that axis, so N devices compute one device's step on the global batch.
  With `skip_nonfinite`, a step whose loss or gradient is not finite leaves the
  parameters, BatchNorm statistics and optimizer state as they were (metric 'skipped').
  """
  images, labels = batch['image'], batch['label']
  teacher_out = teacher(images) if method.needs_teacher else None
  weight_ce = distill.ce_weight(method.name, kd_config)

  def loss_fn(params):
    (logits, features), updates = model.apply(
        {'params': params, 'batch_stats': state.batch_stats}, images, train=True,
        mutable=['batch_stats'])
    student_out = {**features, 'logits': logits}
    ce = distill.cross_entropy(logits, labels)
    terms = method.loss(student_out, teacher_out, labels, kd_config)
    total = weight_ce * ce + sum(terms.values())
    metrics = {'loss': total, 'ce': ce, 'accuracy': _accuracy(logits, labels),
               **{f'kd_{k}': v for k, v in terms.items()}}
    return total, (updates['batch_stats'], metrics)

  grads, (batch_stats, metrics) = jax.grad(loss_fn, has_aux=True)(state.params)
  if teacher_out is not None:
    metrics['teacher_accuracy'] = _accuracy(teacher_out['logits'], labels)
  if axis_name is not None:
    grads, metrics = jax.lax.pmean((grads, metrics), axis_name)
  metrics['grad_norm'] = optax.tree_utils.tree_norm(grads)
  # Huge updates can overflow the running statistics while the loss is still finite.
  metrics['batch_stats_max'] = jnp.max(jnp.stack([jnp.max(jnp.abs(x))
                                              for x in jax.tree.leaves(batch_stats)]))
  new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  metrics['param_norm'] = optax.tree_utils.tree_norm(new_state.params)
  if skip_nonfinite:
    finite = (jnp.isfinite(metrics['loss']) & jnp.isfinite(metrics['grad_norm'])
              & jnp.isfinite(metrics['batch_stats_max']) & jnp.isfinite(metrics['param_norm']))
    new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
    new_state = new_state.replace(step=state.step + 1)  # the data moved on all the same
    metrics['skipped'] = 1.0 - finite.astype(jnp.float32)
  return new_state, metrics


def eval_step(variables: Mapping, batch: Mapping[str, jax.Array], *, model: nn.Module,
              axis_name: Optional[str] = None):
  """Sums of loss and correct predictions over the batch's real (mask True) examples."""
  logits, _ = model.apply(variables, batch['image'], train=False)
  mask = batch['mask'].astype(jnp.float32)
  ce = optax.softmax_cross_entropy_with_integer_labels(distill.wide(logits), batch['label'])
  sums = {'loss_sum': jnp.sum(ce * mask),
          'correct': jnp.sum((jnp.argmax(logits, -1) == batch['label']) * mask),
          'count': jnp.sum(mask)}
  if axis_name is not None:
    sums = jax.lax.psum(sums, axis_name)
  return sums


def _scan_steps(state, xs, num_valid, step_fn):
  """step_fn(state, x) for every x of xs (leading axis K) whose index is < num_valid.

  The entries at num_valid and after are not run (a real conditional): a dispatch
  of at most K steps compiles once, whatever its length. Their metrics are zeros.
  """
  def body(state, ix):
    i, x = ix
    metrics_shape = jax.eval_shape(step_fn, state, x)[1]
    skip = lambda state, x: (state, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                                                  metrics_shape))
    return jax.lax.cond(i < num_valid, step_fn, skip, state, x)

  num_steps = jax.tree.leaves(xs)[0].shape[0]
  return jax.lax.scan(body, state, (jnp.arange(num_steps), xs))


def train_steps_from_batches(state, batches, num_valid, teacher, *, axis_name=None, **step_kw):
  """Up to K train steps in one program, on batches [K, batch, ...] fed by the host."""
  step_fn = lambda state, batch: train_step(state, batch, teacher, axis_name=axis_name, **step_kw)
  return _scan_steps(state, batches, num_valid, step_fn)


def _device_part(batch_size: int, num_shards: int, axis_name):
  """(start, size) of this device's part of a global batch (all of it outside pmap)."""
  size = batch_size // num_shards
  return (jax.lax.axis_index(axis_name) * size if axis_name is not None else 0), size


def train_steps_on_device(state, data, seed, epoch, first_step, num_valid, teacher, *,
                          num_steps: int, batch_size: int, num_shards: int, augment: bool,
                          mean, std, axis_name=None, **step_kw):
  """Up to `num_steps` train steps (epoch steps first_step, ...) in one program, each
  gathering its batch from `data` ({'image': uint8 [N, H, W, C], 'label': [N]}, the whole
  split on the device) and augmenting it in the step. Inside pmap each of the
  `num_shards` devices takes its part of every global batch."""
  permutation = device_data.epoch_permutation(seed, epoch, data['label'].shape[0])
  start, size = _device_part(batch_size, num_shards, axis_name)

  def step_fn(state, step):
    indices = jax.lax.dynamic_slice(permutation, (step * batch_size + start,), (size,))
    images = data['image'][indices]
    if augment:
      keys = device_data.example_keys(seed, epoch, step * batch_size + start + jnp.arange(size))
      images = device_data.augment(images, keys, mean, std)
    else:
      images = device_data.normalize(images, mean, std)
    batch = {'image': images, 'label': data['label'][indices]}
    return train_step(state, batch, teacher, axis_name=axis_name, **step_kw)

  return _scan_steps(state, first_step + jnp.arange(num_steps), num_valid, step_fn)


def eval_on_device(variables, data, *, model: nn.Module, batch_size: int, num_shards: int,
                   mean, std, axis_name=None):
  """eval_step summed over a whole split on the device: data holds 'image' uint8
  [B, batch_size, H, W, C], 'label' and 'mask' [B, batch_size] (padded batches)."""
  start, size = _device_part(batch_size, num_shards, axis_name)

  def sums(batch):
    part = jax.tree.map(lambda x: jax.lax.dynamic_slice_in_dim(x, start, size), batch)
    part['image'] = device_data.normalize(part['image'], mean, std)
    return eval_step(variables, part, model=model, axis_name=axis_name)

  def body(totals, batch):
    return jax.tree.map(jnp.add, totals, sums(batch)), None

  shapes = jax.eval_shape(sums, jax.tree.map(lambda x: x[0], data))
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
  return jax.lax.scan(body, zeros, data)[0]


def train_steps_on_device_vmapped(states, data, seeds, epoch, first_step, num_valid, teacher,
                                  **kw):
  """train_steps_on_device for several independent students at once (jax.vmap): states
  stacked on a leading axis, one seed each (its data order and augmentation), data and
  teacher shared. Each student's result is the one its own run would give; a small
  model trained this way fills a large accelerator."""
  run = functools.partial(train_steps_on_device, **kw)
  return jax.vmap(run, in_axes=(0, None, 0, None, None, None, None))(
      states, data, seeds, epoch, first_step, num_valid, teacher)


def eval_on_device_vmapped(variables, data, **kw):
  """eval_on_device of several students at once: variables stacked on a leading axis."""
  return jax.vmap(functools.partial(eval_on_device, **kw), in_axes=(0, None))(variables, data)
