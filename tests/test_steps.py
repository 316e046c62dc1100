"""The train and eval steps: frozen teacher, metrics, schedule, masking.
(Two-step parity with the reference: test_parity.py.)"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax import device_data, models, steps
from kd_jax.methods.common import cross_entropy
from tests.conftest import step_kw

HEALTH = ('grad_norm', 'param_norm', 'batch_stats_max')


def _setup(method, bn_mode_batch=True, teacher_name='resnet_32_8', dtype=jnp.float32):
  model = models.create_model('resnet_32_8', 10)
  teacher_model = models.create_model(teacher_name, 10)
  tx = steps.create_optimizer(steps.lr_schedule(0.1, 10, (1,), 0.1), 0.9, 1e-4)
  cast = lambda tree: jax.tree.map(lambda x: x.astype(dtype), tree)
  state = steps.create_train_state(
      model, cast(models.init_variables(model, jax.random.key(0))), tx)
  teacher_vars = cast(models.init_variables(teacher_model, jax.random.key(1)))
  # Non-trivial running statistics, so that using them (or not) shows.
  teacher_vars['batch_stats'] = jax.tree.map(lambda a: a + 0.5, teacher_vars['batch_stats'])
  teacher = steps.Teacher(teacher_model, teacher_vars, batch_stats_mode=bn_mode_batch)
  step = jax.jit(functools.partial(steps.train_step, **step_kw(method, model, teacher_model)))
  images = jax.random.normal(jax.random.key(2), (8, 32, 32, 3))
  batch = {'image': images, 'label': jnp.arange(8) % 10}
  return state, teacher, step, batch


def test_teacher_is_frozen():
  state, teacher, step, batch = _setup('at+st')
  before = jax.tree.map(np.array, teacher.variables)
  for _ in range(2):
    state, metrics = step(state, batch, teacher)
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.array, teacher.variables), before)
  assert set(metrics) == {'loss', 'ce', 'accuracy', 'teacher_accuracy', *HEALTH, 'kd_at', 'kd_st'}
  np.testing.assert_allclose(
      metrics['loss'], metrics['ce'] + metrics['kd_at'] + metrics['kd_st'], rtol=1e-6)


def test_no_gradient_reaches_the_teacher():
  state, teacher, _, batch = _setup('st')
  model = models.create_model('resnet_32_8', 10)

  def loss_of_teacher(teacher_vars):
    _, metrics = steps.train_step(state, batch, teacher.replace(variables=teacher_vars),
                                  **step_kw('st', model))
    return metrics['loss']

  grads = jax.jit(jax.grad(loss_of_teacher))(teacher.variables)
  assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree.leaves(grads))


def test_teacher_batch_norm_modes():
  _, teacher, _, batch = _setup('st')
  batch_mode = teacher(batch['image'])['logits']
  running_mode = teacher.replace(batch_stats_mode=False)(batch['image'])['logits']
  model, variables = teacher.model, teacher.variables
  expected_batch = model.apply(variables, batch['image'], train=True, mutable=['batch_stats'])[0][0]
  expected_running = model.apply(variables, batch['image'], train=False)[0]
  np.testing.assert_allclose(batch_mode, expected_batch, rtol=1e-6)
  np.testing.assert_allclose(running_mode, expected_running, rtol=1e-6)
  assert float(jnp.abs(batch_mode - running_mode).max()) > 1e-3


def test_base_never_runs_the_teacher():
  state, _, step, batch = _setup('base')
  state, metrics = step(state, batch, None)
  assert set(metrics) == {'loss', 'ce', 'accuracy', *HEALTH}
  assert int(state.step) == 1


def test_lr_schedule_is_per_epoch_multistep():
  schedule = steps.lr_schedule(0.1, 390, (100, 150), 0.1)
  assert float(schedule(0)) == pytest.approx(0.1)
  assert float(schedule(100 * 390 - 1)) == pytest.approx(0.1)
  assert float(schedule(100 * 390)) == pytest.approx(0.01)
  assert float(schedule(150 * 390)) == pytest.approx(0.001)


def test_sgd_matches_torch_semantics():
  """Coupled decay before momentum; first buffer = gradient (no dampening)."""
  tx = steps.create_optimizer(lambda count: 0.1, 0.9, 1e-2)
  params = {'w': jnp.array([1.0, -2.0])}
  grads = {'w': jnp.array([0.5, 0.5])}
  opt_state = tx.init(params)
  updates, opt_state = tx.update(grads, opt_state, params)
  buf = grads['w'] + 1e-2 * params['w']
  np.testing.assert_allclose(updates['w'], -0.1 * buf, rtol=1e-6)
  params2 = {'w': params['w'] + updates['w']}
  updates, _ = tx.update(grads, opt_state, params2)
  buf = 0.9 * buf + grads['w'] + 1e-2 * params2['w']
  np.testing.assert_allclose(updates['w'], -0.1 * buf, rtol=1e-6)


def test_eval_step_counts_only_real_examples():
  model = models.create_model('resnet_32_8', 10)
  variables = models.init_variables(model, jax.random.key(0))
  images = jax.random.normal(jax.random.key(3), (6, 32, 32, 3))
  labels = jnp.arange(6)
  mask = jnp.array([True, True, True, True, False, False])
  sums = steps.eval_step(variables, {'image': images, 'label': labels, 'mask': mask}, model=model)
  logits, _ = model.apply(variables, images[:4], train=False)
  assert float(sums['count']) == 4
  assert float(sums['correct']) == float(jnp.sum(jnp.argmax(logits, -1) == labels[:4]))
  np.testing.assert_allclose(sums['loss_sum'], 4 * cross_entropy(logits, labels[:4]),
                             rtol=1e-5)


def _assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=rtol, atol=atol), a, b)


def test_scanned_steps_equal_single_steps():
  state, teacher, step, batch = _setup('st')
  images = jax.random.normal(jax.random.key(3), (3, 8, 32, 32, 3))
  batches = {'image': images, 'label': jnp.arange(24).reshape(3, 8) % 10}
  single, expected = state, []
  for i in range(2):
    single, metrics = step(single, jax.tree.map(lambda x: x[i], batches), teacher)
    expected.append(metrics)
  scanned = jax.jit(functools.partial(
      steps.train_steps_from_batches, **step_kw('st', models.create_model('resnet_32_8', 10))))
  # Three compiled steps, two run: the third leaves state and metrics alone.
  got_state, got = scanned(state, batches, 2, teacher)
  assert int(got_state.step) == 2
  _assert_trees_close(got_state.params, single.params)
  _assert_trees_close(got_state.batch_stats, single.batch_stats)
  _assert_trees_close(got_state.opt_state, single.opt_state)
  for i in range(2):
    _assert_trees_close({k: v[i] for k, v in got.items()}, expected[i])
  assert all(float(v[2]) == 0 for v in got.values())


def test_steps_on_device_gather_and_augment_their_batches():
  # In float64 a wrong example or crop shows at once; what remains is the float32
  # rounding of the normalised images, which XLA may fuse differently (~1e-8).
  with jax.enable_x64(True):
    _check_steps_on_device()


def _check_steps_on_device():
  state, teacher, step, _ = _setup('st', dtype=jnp.float64)
  mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
  rng = np.random.default_rng(0)
  data = {'image': jnp.asarray(rng.integers(0, 256, (40, 32, 32, 3), np.uint8)),
          'label': jnp.asarray(rng.integers(0, 10, 40).astype(np.int32))}
  seed, epoch, batch_size = 7, 3, 8
  run = jax.jit(functools.partial(
      steps.train_steps_on_device, num_steps=2, batch_size=batch_size, num_shards=1,
      augment=True, mean=mean, std=std, **step_kw('st', models.create_model('resnet_32_8', 10))))
  got_state, got = run(state, data, seed, epoch, 1, 2, teacher)

  # The same steps with batches built outside: epoch steps 1 and 2.
  permutation = device_data.epoch_permutation(seed, epoch, 40)
  expected = state
  for i, s in enumerate((1, 2)):
    indices = permutation[s * batch_size:(s + 1) * batch_size]
    keys = device_data.example_keys(seed, epoch, s * batch_size + jnp.arange(batch_size))
    batch = {'image': device_data.augment(data['image'][indices], keys, mean, std),
             'label': data['label'][indices]}
    expected, metrics = step(expected, batch, teacher)
    _assert_trees_close({k: v[i] for k, v in got.items()}, metrics, rtol=1e-6, atol=0)
  _assert_trees_close(got_state.params, expected.params, rtol=1e-6, atol=1e-8)
  _assert_trees_close(got_state.batch_stats, expected.batch_stats, rtol=1e-6, atol=1e-8)


def test_eval_on_device_sums_the_real_examples():
  model = models.create_model('resnet_32_8', 10)
  variables = models.init_variables(model, jax.random.key(0))
  rng = np.random.default_rng(1)
  images = rng.integers(0, 256, (2, 6, 32, 32, 3), np.uint8)
  labels = rng.integers(0, 10, (2, 6)).astype(np.int32)
  mask = np.arange(12).reshape(2, 6) < 9
  mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
  got = jax.jit(functools.partial(steps.eval_on_device, model=model, batch_size=6, num_shards=1,
                                  mean=mean, std=std))(
      variables, {'image': images, 'label': labels, 'mask': mask})
  batch = {'image': device_data.normalize(images.reshape(12, 32, 32, 3), mean, std),
           'label': labels.reshape(12), 'mask': mask.reshape(12)}
  want = steps.eval_step(variables, batch, model=model)
  _assert_trees_close(got, want)
  assert float(got['count']) == 9


def test_one_student_on_the_students_axis_is_a_plain_step():
  # Another XLA program (the squeeze), so equal up to float32 rounding, not bit for bit.
  state, teacher, step, batch = _setup('st')
  plain, plain_metrics = step(state, batch, teacher)
  axis = jax.tree.map(lambda x: jnp.asarray(x)[None], state)
  model = models.create_model('resnet_32_8', 10)
  run = jax.jit(functools.partial(steps.over_students(steps.train_step), **step_kw('st', model)))
  got, metrics = run(axis, batch, teacher)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a[0], b, rtol=1e-6, atol=1e-7),
               (got, metrics), (plain, plain_metrics))


def test_vmapped_students_equal_separate_runs():
  """Two students (seeds 3 and 4, each its own initialisation, data order and
  augmentation) trained in one vmapped program give what two separate runs give: in
  float64, up to the float32 rounding of the normalised images (~1e-8, see above)."""
  with jax.enable_x64(True):
    _, teacher, _, _ = _setup('st', dtype=jnp.float64)
    model = models.create_model('resnet_32_8', 10)
    tx = steps.create_optimizer(steps.lr_schedule(0.1, 10, (1,), 0.1), 0.9, 1e-4)
    seeds = (3, 4)
    states = [steps.create_train_state(model, jax.tree.map(
        lambda x: x.astype(jnp.float64), models.init_variables(model, jax.random.key(s))), tx, s)
              for s in seeds]
    rng = np.random.default_rng(0)
    data = {'image': jnp.asarray(rng.integers(0, 256, (24, 32, 32, 3), np.uint8)),
            'label': jnp.asarray(rng.integers(0, 10, 24).astype(np.int32))}
    kw = dict(num_steps=2, batch_size=8, num_shards=1, augment=True, mean=(0.5,) * 3,
              std=(0.25,) * 3, **step_kw('st', model))
    separate = [jax.jit(functools.partial(steps.train_steps_on_device, **kw))(
        state, data, seed, 1, 0, 2, teacher) for state, seed in zip(states, seeds)]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *states)
    together, metrics = jax.jit(functools.partial(
        steps.over_students(steps.train_steps_on_device, student_args=(0, 2)), **kw))(
        stacked, data, jnp.array(seeds), 1, 0, 2, teacher)
    for i, (state, student_metrics) in enumerate(separate):
      _assert_trees_close(jax.tree.map(lambda x: x[i], together.params), state.params,
                          rtol=1e-6, atol=1e-8)
      _assert_trees_close(jax.tree.map(lambda x: x[i], together.batch_stats),
                          state.batch_stats, rtol=1e-6, atol=1e-8)
      _assert_trees_close(jax.tree.map(lambda x: x[i], metrics), student_metrics,
                          rtol=1e-6, atol=1e-8)
    # Different students, not copies.
    assert float(jnp.abs(together.params['student']['fc']['kernel'][0]
                         - together.params['student']['fc']['kernel'][1]).max()) > 1e-3
