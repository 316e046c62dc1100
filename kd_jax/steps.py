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

from kd_jax import device_data
from kd_jax.methods import distiller as distiller_lib
from kd_jax.methods.common import cross_entropy, wide


class TrainState(train_state.TrainState):
  """params and batch_stats hold {'student': ..., 'method': {<method>: ...}}: a method's
  connectors train with the student. `method_state` is the methods' non-gradient state
  (e.g. CRD's memory); `rng` (raw key data) gives each step its key."""
  batch_stats: Any = None
  method_state: Any = None
  rng: Any = None

  def student_variables(self):
    return {'params': self.params['student'], 'batch_stats': self.batch_stats['student']}


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


def create_train_state(model: nn.Module, variables: Mapping, tx, seed: int = 0,
                       method_variables: Optional[Mapping] = None) -> TrainState:
  """The state of a student (its {'params', 'batch_stats'}) and its methods' variables."""
  method_variables = method_variables or {}
  return TrainState.create(
      apply_fn=model.apply, tx=tx,
      params={'student': variables['params'], 'method': method_variables.get('params', {})},
      batch_stats={'student': variables['batch_stats'],
                   'method': method_variables.get('batch_stats', {})},
      method_state=method_variables.get('method_state', {}),
      rng=jax.random.key_data(jax.random.key(seed)))


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
               *, model: nn.Module, distiller: distiller_lib.Distiller, steps_per_epoch: int,
               skip_nonfinite: bool = False, axis_name: Optional[str] = None):
  """One SGD step on the student and its methods' connectors; returns (new state, metrics).

  With `axis_name` (inside pmap), gradients, metrics and BatchNorm statistics are
  averaged over that axis, so N devices compute one device's step on the global batch.
  With `skip_nonfinite`, a step whose loss or gradient is not finite leaves the
  parameters, BatchNorm statistics and optimizer state as they were (metric 'skipped').
  """
  images, labels = batch['image'], batch['label']
  teacher_out = teacher(images) if distiller.needs_teacher else None
  method_batch = {**{k: v for k, v in batch.items() if k not in ('image', 'label', 'index')},
                  'label': labels,
                  'index': batch.get('index', jnp.zeros_like(labels)),
                  'key': jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step),
                  # Not arrays: the pmap axis to gather over (CRD's memory) and the frozen
                  # teacher's variables (OFD's margins come from its BatchNorms).
                  'axis_name': axis_name,
                  'teacher_variables': teacher.variables if teacher is not None else None}
  # mdistiller counts epochs from 1.
  step = jnp.asarray(state.step, jnp.int32)
  progress = {'epoch': step // steps_per_epoch + 1, 'step': step}

  def loss_fn(params):
    (logits, features), updates = model.apply(
        {'params': params['student'], 'batch_stats': state.batch_stats['student']}, images,
        train=True, mutable=['batch_stats'])
    student_out = {**features, 'logits': logits}
    ce = cross_entropy(logits, labels)
    terms, method_updates = distiller.apply(
        {'params': params['method'], 'batch_stats': state.batch_stats['method'],
         'method_state': state.method_state},
        student_out, teacher_out, method_batch, progress, train=True)
    total = distiller.ce_weight * ce + sum(terms.values())
    metrics = {'loss': total, 'ce': ce, 'accuracy': _accuracy(logits, labels),
               **{f'kd_{k}': v for k, v in terms.items()}}
    batch_stats = {'student': updates['batch_stats'], 'method': method_updates['batch_stats']}
    return total, (batch_stats, method_updates['method_state'], metrics)

  grads, (batch_stats, method_state, metrics) = jax.grad(loss_fn, has_aux=True)(state.params)
  if teacher_out is not None:
    metrics['teacher_accuracy'] = _accuracy(teacher_out['logits'], labels)
  if axis_name is not None:
    grads, metrics = jax.lax.pmean((grads, metrics), axis_name)
  metrics['grad_norm'] = optax.tree_utils.tree_norm(grads)
  # Huge updates can overflow the running statistics while the loss is still finite.
  metrics['batch_stats_max'] = jnp.max(jnp.stack([jnp.max(jnp.abs(x))
                                              for x in jax.tree.leaves(batch_stats)]))
  new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats,
                                    method_state=method_state)
  metrics['param_norm'] = optax.tree_utils.tree_norm(new_state.params)
  if skip_nonfinite:
    finite = (jnp.isfinite(metrics['loss']) & jnp.isfinite(metrics['grad_norm'])
              & jnp.isfinite(metrics['batch_stats_max']) & jnp.isfinite(metrics['param_norm']))
    new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
    new_state = new_state.replace(step=state.step + 1)  # the data moved on all the same
    metrics['skipped'] = 1.0 - finite.astype(jnp.float32)
  return new_state, metrics


@struct.dataclass
class InitStageState:
  """The init stage's carry: the train state it trains a part of (its own step and
  optimizer state stay those of a fresh main stage), that part's optimizer state (SGD
  as the main stage's, lr constant) and the init steps done."""
  train: TrainState
  opt_state: Any
  step: Any


def init_stage_part(state: TrainState, init: distiller_lib.InitStage, head: Sequence[str]):
  """The variables the init stage trains (see methods.INIT_STAGE_TRAINS); `head`: the
  student's top-level modules it leaves alone (models.head_modules)."""
  if init.trains == 'student_features+method_params':
    return {'student': {k: v for k, v in state.params['student'].items() if k not in head},
            'method': state.params['method'].get(init.method, {})}
  name = init.trains.split(':', 1)[1]
  return state.method_state[init.method][name]


def with_init_stage_part(state: TrainState, init: distiller_lib.InitStage, part) -> TrainState:
  """`state` with the variables `init_stage_part` took replaced by `part`."""
  if init.trains == 'student_features+method_params':
    method = dict(state.params['method'])
    if init.method in method:  # a method without connectors has no entry
      method[init.method] = part['method']
    return state.replace(params={'student': {**state.params['student'], **part['student']},
                                 'method': method})
  name = init.trains.split(':', 1)[1]
  own = {**state.method_state[init.method], name: part}
  return state.replace(method_state={**state.method_state, init.method: own})


def create_init_stage_state(state: TrainState, init: distiller_lib.InitStage, head,
                            tx: optax.GradientTransformation) -> InitStageState:
  return InitStageState(state, tx.init(init_stage_part(state, init, head)), jnp.int32(0))


def init_stage_step(carry: InitStageState, batch: Mapping[str, jax.Array],
                    teacher: Optional[Teacher], *, model: nn.Module,
                    distiller: distiller_lib.Distiller, head: Sequence[str],
                    tx: optax.GradientTransformation, axis_name: Optional[str] = None):
  """One SGD step of the init stage (RepDistiller's helper/pretrain.py `init`): the
  plain sum of the init method's `init_terms`, minimised over the part it trains. The
  teacher runs as in the main stage; the student, when its features train, in train
  mode, keeping the BatchNorm statistics of its feature layers only (its head stays in
  eval mode there). Returns (new carry, metrics)."""
  init, state = distiller.init_stage, carry.train
  images = batch['image']
  teacher_out = teacher(images)
  method_batch = {'label': batch['label'],
                  'index': batch.get('index', jnp.zeros_like(batch['label'])),
                  'key': jax.random.fold_in(jax.random.fold_in(
                      jax.random.wrap_key_data(state.rng), 1), carry.step),
                  'axis_name': axis_name, 'teacher_variables': teacher.variables}
  progress = {'epoch': jnp.int32(0), 'step': jnp.asarray(carry.step, jnp.int32)}
  runs_student = init.trains == 'student_features+method_params'

  def loss_fn(part):
    trained = with_init_stage_part(state, init, part)
    student_out, student_stats = None, state.batch_stats['student']
    if runs_student:
      (logits, features), updates = model.apply(
          {'params': trained.params['student'], 'batch_stats': student_stats}, images,
          train=True, mutable=['batch_stats'])
      student_out = {**features, 'logits': logits}
      student_stats = {k: v if k in head else updates['batch_stats'][k]
                       for k, v in student_stats.items()}
    terms, method_updates = distiller.init_terms(
        {'params': trained.params['method'], 'batch_stats': state.batch_stats['method'],
         'method_state': trained.method_state},
        student_out, teacher_out, method_batch, progress)
    total = sum(terms.values())
    batch_stats = {'student': student_stats, 'method': method_updates['batch_stats']}
    return total, (batch_stats, method_updates['method_state'], {'loss': total, **terms})

  part = init_stage_part(state, init, head)
  grads, (batch_stats, method_state, metrics) = jax.grad(loss_fn, has_aux=True)(part)
  if axis_name is not None:
    grads, metrics = jax.lax.pmean((grads, metrics), axis_name)
  metrics['grad_norm'] = optax.tree_utils.tree_norm(grads)
  updates, opt_state = tx.update(grads, carry.opt_state, part)
  state = state.replace(batch_stats=batch_stats, method_state=method_state)
  state = with_init_stage_part(state, init, optax.apply_updates(part, updates))
  return InitStageState(state, opt_state, carry.step + 1), metrics


def eval_step(variables: Mapping, batch: Mapping[str, jax.Array], *, model: nn.Module,
              axis_name: Optional[str] = None):
  """Sums of loss and correct predictions over the batch's real (mask True) examples."""
  logits, _ = model.apply(variables, batch['image'], train=False)
  mask = batch['mask'].astype(jnp.float32)
  ce = optax.softmax_cross_entropy_with_integer_labels(wide(logits), batch['label'])
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


def train_steps_from_batches(state, batches, num_valid, teacher, *, axis_name=None,
                             step=train_step, **step_kw):
  """Up to K steps (`step`: train_step, or init_stage_step) in one program, on batches
  [K, batch, ...] fed by the host."""
  step_fn = lambda state, batch: step(state, batch, teacher, axis_name=axis_name, **step_kw)
  return _scan_steps(state, batches, num_valid, step_fn)


def _device_part(batch_size: int, num_shards: int, axis_name):
  """(start, size) of this device's part of a global batch (all of it outside pmap)."""
  size = batch_size // num_shards
  return (jax.lax.axis_index(axis_name) * size if axis_name is not None else 0), size


def train_steps_on_device(state, data, seed, epoch, first_step, num_valid, teacher, *,
                          num_steps: int, batch_size: int, num_shards: int, augment: bool,
                          padding_mode: str = 'reflect',
                          mean, std, axis_name=None, step=train_step, **step_kw):
  """Up to `num_steps` steps (`step`: train_step, or init_stage_step; epoch steps
  first_step, ...) in one program, each
  gathering its batch from `data` ({'image': uint8 [N, H, W, C], 'label': [N]}, the whole
  split on the device) and augmenting it in the step. Inside pmap each of the
  `num_shards` devices takes its part of every global batch."""
  permutation = device_data.epoch_permutation(seed, epoch, data['label'].shape[0])
  start, size = _device_part(batch_size, num_shards, axis_name)

  def step_fn(state, i):
    indices = jax.lax.dynamic_slice(permutation, (i * batch_size + start,), (size,))
    images = data['image'][indices]
    if augment:
      keys = device_data.example_keys(seed, epoch, i * batch_size + start + jnp.arange(size))
      images = device_data.augment(images, keys, mean, std, padding_mode=padding_mode)
    else:
      images = device_data.normalize(images, mean, std)
    batch = {'image': images, 'label': data['label'][indices], 'index': indices}
    return step(state, batch, teacher, axis_name=axis_name, **step_kw)

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


def over_students(fn, student_args=(0,)):
  """`fn` for N >= 1 students: the arguments at positions `student_args` carry a leading
  students axis (states, seeds, variables), the others are shared (data, teacher); so do
  the outputs. Each student's result is the one its own run gives. One student runs
  without vmap, which keeps its program (and its bits) those of a plain run; several are
  vmapped, which fills an accelerator that one small model leaves idle."""

  def run(*args, **kwargs):
    num = jax.tree.leaves(args[student_args[0]])[0].shape[0]
    if num == 1:
      args = [jax.tree.map(lambda x: x[0], a) if i in student_args else a
              for i, a in enumerate(args)]
      return jax.tree.map(lambda x: x[None], fn(*args, **kwargs))
    in_axes = [0 if i in student_args else None for i in range(len(args))]
    return jax.vmap(functools.partial(fn, **kwargs), in_axes=in_axes)(*args)

  return run
