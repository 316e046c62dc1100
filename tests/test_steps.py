"""The train and eval steps: frozen teacher, metrics, schedule, masking.
(Two-step parity with the reference: test_parity.py.)"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax import distill, models, steps

HEALTH = ('grad_norm', 'param_norm', 'batch_stats_max')
KD = {'temperature': 4.0, 'st_weight': 1.0, 'at_beta': 1000.0, 'logit_target': 'pooled',
      'alpha': None}


def _setup(method, bn_mode_batch=True, teacher_name='resnet_32_8'):
  model = models.create_model('resnet_32_8', 10)
  teacher_model = models.create_model(teacher_name, 10)
  tx = steps.create_optimizer(steps.lr_schedule(0.1, 10, (1,), 0.1), 0.9, 1e-4)
  state = steps.create_train_state(model, models.init_variables(model, jax.random.key(0)), tx)
  teacher_vars = models.init_variables(teacher_model, jax.random.key(1))
  # Non-trivial running statistics, so that using them (or not) shows.
  teacher_vars['batch_stats'] = jax.tree.map(lambda a: a + 0.5, teacher_vars['batch_stats'])
  teacher = steps.Teacher(teacher_model, teacher_vars, batch_stats_mode=bn_mode_batch)
  step = jax.jit(functools.partial(steps.train_step, model=model,
                                   method=distill.get_method(method), kd_config=KD))
  images = jax.random.normal(jax.random.key(2), (8, 32, 32, 3))
  batch = {'image': images, 'label': jnp.arange(8) % 10}
  return state, teacher, step, batch


def test_teacher_is_frozen():
  state, teacher, step, batch = _setup('at_st')
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
                                  model=model, method=distill.get_method('st'), kd_config=KD)
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
  np.testing.assert_allclose(sums['loss_sum'], 4 * distill.cross_entropy(logits, labels[:4]),
                             rtol=1e-5)
