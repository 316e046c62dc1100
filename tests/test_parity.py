"""Parity with the reference's own PyTorch code, through the golden vectors in
KD_PARITY_DIR (default tests/data/parity; see its README): model forward passes,
every loss term, and two optimizer steps of every method."""
import functools

import jax
import jax.numpy as jnp
import pytest

from kd_jax import methods, steps, torch_import
from kd_jax.methods import distiller
from kd_jax.methods.common import cross_entropy
from tests.conftest import import_reference, load_parity, prefixed, rel_err, step_kw

OUTPUTS = ('stem', 'stage1', 'stage2', 'stage3', 'pooled', 'logits')
METHODS = ('base', 'logit', 'st', 'at', 'at+st', 'fsp')
# The reference's settings are the methods' defaults, but at_st weighs its soft-target
# term 0.9 (configs/default.py), and the seed's fsp is its own form.
FIELDS_OF = {'at+st': {'st': {'weight': 0.9}}}


@pytest.mark.parametrize('mode', ['eval', 'train'])
@pytest.mark.parametrize('file,name', [('model_resnet_32_20_c100.npz', 'resnet_32_20'),
                                       ('model_resnet_32_110_c10.npz', 'resnet_32_110')])
def test_forward(file, name, mode):
  vectors = load_parity(file)
  model, variables = import_reference(vectors, 'state', name)
  forward = jax.jit(functools.partial(model.apply, train=mode == 'train', mutable=['batch_stats']))
  (logits, features), updates = forward(variables, jnp.asarray(vectors['x']))
  outputs = {**features, 'logits': logits}
  for out in OUTPUTS:
    assert outputs[out].shape == vectors[f'{mode}/{out}'].shape, out
    assert rel_err(outputs[out], vectors[f'{mode}/{out}']) < 1e-4, out
  after = torch_import.flax_to_torch({'params': variables['params'], **updates}, model)
  if mode == 'train':
    # We match PyTorch's running statistics: unbiased batch variance (n / (n - 1)),
    # momentum 0.1 (0.9 in Flax terms).
    expected = prefixed(vectors, 'state_after_train_forward')
    assert expected
    for key, value in expected.items():
      assert rel_err(after[key], value) < 1e-4, key
  else:
    for key in after:
      if key.endswith(('running_mean', 'running_var')):
        assert rel_err(after[key], vectors[f'state/{key}']) == 0, key


def test_losses():
  vectors = load_parity('losses_c100.npz')
  student, teacher = prefixed(vectors, 'student'), prefixed(vectors, 'teacher')
  labels = jnp.asarray(vectors['labels'])
  shapes = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in student.items()}
  ctx = methods.Context(student=shapes, teacher=shapes, num_classes=student['logits'].shape[1],
                        train_size=100, steps_per_epoch=10)
  batch = {'label': labels, 'index': jnp.arange(len(labels)), 'key': jax.random.key(0)}
  progress = {'epoch': jnp.int32(1), 'step': jnp.int32(0)}

  def terms_of(method):
    d = distiller.build(method, FIELDS_OF.get(method, {}), ctx)
    return d.apply({}, student, teacher, batch, progress, train=True)[0]

  got = {'ce': cross_entropy(student['logits'], labels)}
  for method in ('logit', 'st', 'at', 'fsp'):
    got[method] = terms_of(method)[method]
  at_st = terms_of('at+st')
  got['at_st.st'] = at_st['st']
  assert rel_err(at_st['at'], vectors['loss/at']) < 1e-5
  for key, value in got.items():
    assert rel_err(value, vectors[f'loss/{key}']) < 1e-5, key


@pytest.mark.parametrize('method', METHODS)
def test_two_train_steps(method):
  """The project's own train step, in float64, against the reference's SGD steps."""
  common = load_parity('step_common.npz')
  expected = load_parity(f"step_{method.replace('+', '_')}.npz")
  with jax.enable_x64(True):
    as64 = lambda tree: jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), tree)
    model, student = import_reference(common, 'student0', 'resnet_32_20')
    teacher_model, teacher_vars = import_reference(common, 'teacher', 'resnet_32_20')
    tx = steps.create_optimizer(lambda count: float(common['lr']), float(common['momentum']),
                                float(common['weight_decay']))
    state = steps.create_train_state(model, as64(student), tx)
    teacher = steps.Teacher(teacher_model, as64(teacher_vars), batch_stats_mode=True)
    train_step = jax.jit(functools.partial(
        steps.train_step, **step_kw(method, model, teacher_model, **FIELDS_OF.get(method, {}))))
    for i in (1, 2):
      batch = {'image': jnp.asarray(common[f'x{i}'], jnp.float64),
               'label': jnp.asarray(common[f'y{i}'], jnp.int32)}
      state, metrics = train_step(state, batch, teacher)
      kd = sum(v for k, v in metrics.items() if k.startswith('kd_'))
      assert abs(float(metrics['ce']) - expected[f'loss{i}/ce']) < 1e-6 * abs(expected[f'loss{i}/ce'])
      assert abs(float(kd) - expected[f'loss{i}/kd']) <= 1e-6 * max(abs(expected[f'loss{i}/kd']), 1e-12)
      got = {k: v for k, v in torch_import.flax_to_torch(
          state.student_variables(), model).items()
             if not k.endswith('num_batches_tracked')}
      want = {k: v for k, v in prefixed(expected, f'student{i}').items()
              if not k.endswith('num_batches_tracked')}
      assert set(got) == set(want)
      assert all(v.dtype == jnp.float64 for v in jax.tree.leaves(state.params['student']))
      for key, value in want.items():
        assert rel_err(got[key], value) < 1e-6, (i, key)
