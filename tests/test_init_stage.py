"""RepDistiller's init stage (`init_epochs` of ab, ft, fsp): its step trains exactly its
part by SGD on the sum of the init terms, on one device, two devices and students
together; the loop runs it first, records it and resumes it exactly."""
import json
import logging
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from kd_jax import checkpoints, methods, models, steps, train
from kd_jax.methods import distiller
from tests.conftest import data, random_variables, run_worker, tiny_config, tree_listing

LR, MOMENTUM, WD = 0.05, 0.9, 5e-4
TEACHERS = {'ab': 'resnet_32_8', 'ft': 'resnet8'}  # ab: 32x32 -> 28x28 maps, connectors


class Killed(Exception):
  pass


def _init_stage(method, seed=0):
  """(carry, step kwargs, batch, teacher) of `method`'s init stage, student resnet8."""
  model = models.create_model('resnet8', 10)
  teacher_model = models.create_model(TEACHERS[method], 10)
  d, ctx = distiller.for_models(method, {method: {'init_epochs': 1}}, model, teacher_model,
                                batch_size=4, num_classes=10, train_size=64, steps_per_epoch=4)
  tx = steps.create_optimizer(LR, MOMENTUM, WD)
  state = steps.create_train_state(
      model, models.init_variables(model, jax.random.key(seed)), tx, seed,
      distiller.init_variables(d, ctx, jax.random.key(seed + 1), 4))
  teacher = steps.Teacher(teacher_model, random_variables(teacher_model, 9),
                          batch_stats_mode=False)
  rng = np.random.default_rng(0)
  batch = {'image': jnp.asarray(rng.normal(size=(4, 32, 32, 3)), jnp.float32),
           'label': jnp.asarray(rng.integers(0, 10, 4), jnp.int32)}
  head = models.head_modules(model)
  kw = dict(model=model, distiller=d, head=head, tx=tx)
  return steps.create_init_stage_state(state, d.init_stage, head, tx), kw, batch, teacher


def _init_loss(method, kw, batch, teacher):
  """The init stage's loss written out: loss(state, params, method_state) -> (value,
  the student's new BatchNorm statistics, or None where the student is not run)."""
  model, module = kw['model'], dict(kw['distiller'].parts)[method]
  t = teacher(batch['image'])

  def loss(state, params, method_state):
    student, student_stats = None, None
    if method == 'ab':
      (logits, features), updates = model.apply(
          {'params': params['student'], 'batch_stats': state.batch_stats['student']},
          batch['image'], train=True, mutable=['batch_stats'])
      student, student_stats = {**features, 'logits': logits}, updates['batch_stats']
    own = {'params': params['method'].get(method, {}),
           'batch_stats': state.batch_stats['method'].get(method, {}),
           'method_state': method_state.get(method, {})}
    terms, _ = module.apply(own, student, t, {'label': batch['label']}, None, train=True,
                            method='init_terms', mutable=['batch_stats'])
    return sum(terms.values()), student_stats

  return loss


def _sgd(params, grads, momentum=None):
  """torch.optim.SGD (coupled weight decay): (new params, momentum buffer)."""
  d = jax.tree.map(lambda g, p: g + WD * p, grads, params)
  buf = d if momentum is None else jax.tree.map(lambda b, x: MOMENTUM * b + x, momentum, d)
  return jax.tree.map(lambda p, b: p - LR * b, params, buf), buf


def _flat(tree):
  return traverse_util.flatten_dict(jax.device_get(tree), sep='/')


def _changed(before, after):
  a, b = _flat(before), _flat(after)
  return {k for k in a if not np.array_equal(a[k], b[k])}


def test_ab_init_steps_train_student_features_and_connectors_by_sgd():
  carry, kw, batch, teacher = _init_stage('ab')
  state0 = carry.train
  step = jax.jit(lambda c: steps.init_stage_step(c, batch, teacher, **kw))
  carry1, metrics = step(carry)
  carry2, _ = step(carry1)
  state1, state2 = carry1.train, carry2.train

  # The loss written out; in train mode it does not depend on the BatchNorm statistics.
  loss = _init_loss('ab', kw, batch, teacher)
  value_and_grad = jax.jit(jax.value_and_grad(lambda p: loss(state0, p, {}), has_aux=True))
  (value, student_stats), grads0 = value_and_grad(state0.params)
  # Trained: the student but its classifier, and AB's connectors; by SGD with momentum.
  trained = lambda params: {'student': {k: v for k, v in params['student'].items() if k != 'fc'},
                            'method': params['method']}
  expected1, buf = _sgd(trained(state0.params), trained(grads0))
  expected2, _ = _sgd(expected1, trained(value_and_grad(state1.params)[1]), buf)
  for got, want in ((state1.params, expected1), (state2.params, expected2)):
    want, got = _flat(want), _flat(trained(got))
    assert set(want) == set(got)
    for k in want:
      np.testing.assert_allclose(got[k], want[k], rtol=2e-5, atol=1e-6, err_msg=k)
  assert {k.split('/')[0] for k in _changed(state0.params, state1.params)} == {'student', 'method'}
  assert not _changed(state0.params['student']['fc'], state2.params['student']['fc'])
  assert _flat(state1.params['method']['ab'])  # connectors exist (and changed, above)
  np.testing.assert_allclose(metrics['loss'], value, rtol=1e-5)
  # BatchNorm: the student's (train mode) and the connectors' statistics update.
  want_stats, got_stats = _flat(student_stats), _flat(state1.batch_stats['student'])
  for k in want_stats:
    np.testing.assert_allclose(got_stats[k], want_stats[k], rtol=1e-5, atol=1e-7, err_msg=k)
  assert _changed(state0.batch_stats['method'], state1.batch_stats['method'])
  # The main stage's step counter and optimizer state are untouched: it starts fresh.
  assert int(state2.step) == 0 and int(carry2.step) == 2
  jax.tree.map(np.testing.assert_array_equal, state2.opt_state, state0.opt_state)

  # Students together (num_seeds, vmapped): each takes the step it takes alone.
  other = _init_stage('ab', seed=5)[0]
  other = other.replace(train=other.train.replace(tx=kw['tx'], apply_fn=kw['model'].apply))
  together = jax.jit(steps.over_students(lambda c: steps.init_stage_step(c, batch, teacher, **kw)))
  stacked, _ = together(jax.tree.map(lambda *xs: jnp.stack(xs), carry, other))
  for i, alone in enumerate((carry1, step(other)[0])):
    got = _flat(jax.tree.map(lambda x: x[i], stacked.train.params))
    for k, v in _flat(alone.train.params).items():
      np.testing.assert_allclose(got[k], v, rtol=1e-5, atol=1e-6, err_msg=k)


def test_at_weight_0_after_the_init_stage_the_main_step_runs_neither_method_nor_teacher():
  """RepDistiller's AB and FSP main stage (init stage, then weight 0) is CE alone: kd_jax
  does not run their modules there (no terms, connector statistics kept) nor the teacher,
  and the student steps as with the weighted-by-0 terms computed."""
  model = models.create_model('resnet8', 10)
  teacher_model = models.create_model(TEACHERS['ab'], 10)
  kw = dict(batch_size=4, num_classes=10, train_size=64, steps_per_epoch=4)
  off, ctx = distiller.for_models('ab', {'ab': {'init_epochs': 1, 'weight': 0.0}}, model,
                                  teacher_model, **kw)
  on, _ = distiller.for_models('ab', {'ab': {'weight': 0.0}}, model, teacher_model, **kw)
  assert (off.main_stage_off, off.needs_teacher) == (('ab',), False)
  assert (on.main_stage_off, on.needs_teacher) == ((), True)
  fsp, _ = distiller.for_models('fsp', {'fsp': {'init_epochs': 1, 'weight': 0.0}}, model,
                                models.create_model('resnet8', 10), **kw)
  assert (fsp.main_stage_off, fsp.needs_teacher) == (('fsp',), False)
  weighted, _ = distiller.for_models('ab', {'ab': {'init_epochs': 1}}, model, teacher_model,
                                     **kw)
  assert (weighted.main_stage_off, weighted.needs_teacher) == ((), True)

  tx = steps.create_optimizer(LR, MOMENTUM, WD)
  state = steps.create_train_state(
      model, models.init_variables(model, jax.random.key(0)), tx, 0,
      distiller.init_variables(off, ctx, jax.random.key(1), 4))
  teacher = steps.Teacher(teacher_model, random_variables(teacher_model, 9),
                          batch_stats_mode=False)
  rng = np.random.default_rng(0)
  batch = {'image': jnp.asarray(rng.normal(size=(4, 32, 32, 3)), jnp.float32),
           'label': jnp.asarray(rng.integers(0, 10, 4), jnp.int32)}
  new_off, metrics_off = steps.train_step(state, batch, None, model=model, distiller=off,
                                          steps_per_epoch=4)
  new_on, metrics_on = steps.train_step(state, batch, teacher, model=model, distiller=on,
                                        steps_per_epoch=4)
  assert 'kd_ab' in metrics_on and 'kd_ab' not in metrics_off
  assert 'teacher_accuracy' not in metrics_off
  for part in ('params', 'batch_stats'):
    a, b = _flat(getattr(new_off, part)['student']), _flat(getattr(new_on, part)['student'])
    for k in a:
      np.testing.assert_allclose(a[k], b[k], rtol=1e-6, atol=1e-7, err_msg=f'{part}/{k}')
  # The connectors' BatchNorm statistics: kept by the skipped module, updated by the run one.
  assert not _changed(state.batch_stats['method'], new_off.batch_stats['method'])
  assert _changed(state.batch_stats['method'], new_on.batch_stats['method'])


def test_ft_init_step_trains_only_the_paraphraser():
  carry, kw, batch, teacher = _init_stage('ft')
  state0 = carry.train
  carry1, metrics = jax.jit(lambda c: steps.init_stage_step(c, batch, teacher, **kw))(carry)
  state1 = carry1.train
  assert _changed(state0.params, state1.params) == set()  # student and translator
  assert _changed(state0.batch_stats, state1.batch_stats) == set()  # the student is not run
  paraphraser = state0.method_state['ft']['paraphraser']
  assert _changed(state0.method_state, state1.method_state) == {
      f'ft/paraphraser/{k}' for k in _flat(paraphraser)}

  loss = _init_loss('ft', kw, batch, teacher)
  value_and_grad = jax.jit(jax.value_and_grad(
      lambda p: loss(state0, state0.params, {'ft': {'paraphraser': p}})[0]))
  value, grads = value_and_grad(paraphraser)
  expected, _ = _sgd(paraphraser, grads)
  got, want = _flat(state1.method_state['ft']['paraphraser']), _flat(expected)
  for k in want:
    np.testing.assert_allclose(got[k], want[k], rtol=2e-5, atol=1e-6, err_msg=k)
  np.testing.assert_allclose(metrics['loss'], value, rtol=1e-5)
  assert set(metrics) == {'loss', 'ft_reconstruction', 'grad_norm'}


@pytest.fixture(scope='module')
def teacher_dir(tmp_path_factory):
  """A run directory holding a random resnet_32_8 as its best checkpoint: a teacher
  without training one."""
  path = str(tmp_path_factory.mktemp('teacher'))
  model = models.create_model('resnet_32_8', 10)
  ckpt = checkpoints.RunCheckpoints(path)
  ckpt.save_best(0, random_variables(model, 7),
                 {'model': 'resnet_32_8', 'dataset': 'cifar10', 'num_classes': 10,
                  'image_shape': [32, 32, 3]})
  ckpt.close()
  return path


def _overrides(teacher_dir):
  """AB from resnet_32_8 to resnet8 (32x32 maps to 28x28 ones: connectors), 1 init epoch
  of 4 steps, then 1 epoch, checkpoints every 2 steps."""
  return {'method': 'ab', 'model': 'resnet8', 'num_epochs': 1, 'checkpoint_every_steps': 2,
          'distill.ab.init_epochs': 1, 'teacher.checkpoint': teacher_dir}


class _Lines(logging.Handler):

  def __init__(self):
    super().__init__()
    self.lines = []

  def emit(self, record):
    self.lines.append(record.getMessage())


@pytest.fixture(scope='module')
def reference(tmp_path_factory, teacher_dir):
  """(result, run directory, log lines) of one uninterrupted run with an init stage."""
  config = tiny_config(**_overrides(teacher_dir))
  workdir = tmp_path_factory.mktemp('uninterrupted')
  lines, absl_logger = _Lines(), logging.getLogger('absl')
  level = absl_logger.level
  absl_logger.addHandler(lines)
  absl_logger.setLevel(logging.INFO)
  try:
    with data():
      result = train.train_and_evaluate(config, str(workdir))
  finally:
    absl_logger.removeHandler(lines)
    absl_logger.setLevel(level)
  return result, workdir / train.run_name(config), lines.lines


def test_init_stage_runs_first_and_is_recorded(reference):
  result, run_dir, lines = reference
  record = result['init_stage']
  assert (record['method'], record['trains'], record['epochs'], record['steps']) == (
      'ab', 'student_features+method_params', 1, 4)
  assert record['learning_rate'] == tiny_config().learning_rate  # the run's
  assert [h['epoch'] for h in record['history']] == [1]
  assert all(math.isfinite(h['init_loss']) and h['init_loss'] > 0 for h in record['history'])
  assert {'init_ab_stage1', 'init_grad_norm'} <= set(record['history'][0])
  assert result['steps'] == 4 and len(result['history']) == 1  # the main stage's own
  assert [line.split(': ')[1] for line in lines if ': init loss' in line] == ['init epoch 1/1']
  assert not (run_dir / checkpoints.INIT_STAGE).exists()  # gone once the main stage saved

  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  (events,) = [str(p) for p in run_dir.glob('events.out.tfevents.*')]
  acc = event_accumulator.EventAccumulator(events, size_guidance={'tensors': 0})
  acc.Reload()
  assert {'init/loss', 'init/ab_stage1', 'init/epoch', 'train/loss'} <= set(acc.Tags()['tensors'])


def _best_params(run_dir):
  variables, _ = checkpoints.restore_best(str(run_dir))
  return _flat(variables['params'])


def test_stopped_runs_resume_where_they_stopped(tmp_path, teacher_dir, reference, monkeypatch):
  """Stopped in the init stage (at its step 4's checkpoint): it resumes from its step 2,
  mid-epoch, and the run is the uninterrupted one bit for bit. A run past the init stage
  (its result lost, its last checkpoint kept) never reruns it."""
  config = tiny_config(**_overrides(teacher_dir))
  real_save = checkpoints.RunCheckpoints.save_latest

  def save_or_die(self, step, state, meta):
    if (self.latest.directory.name, step) == (checkpoints.INIT_STAGE, 4):
      monkeypatch.setattr(checkpoints.RunCheckpoints, 'save_latest', real_save)
      raise Killed('saving the init stage\'s step 4')
    real_save(self, step, state, meta)

  init_stages = []
  real_init_stage = train._init_stage  # pylint: disable=protected-access

  def counted(runs, state, *args):
    init_stages.append(max(checkpoints.saved_steps(runs[0].dir, checkpoints.INIT_STAGE),
                           default=0))
    return real_init_stage(runs, state, *args)

  monkeypatch.setattr(checkpoints.RunCheckpoints, 'save_latest', save_or_die)
  monkeypatch.setattr(train, '_init_stage', counted)
  run_dir = tmp_path / train.run_name(config)
  with data():
    with pytest.raises(Killed):
      train.train_and_evaluate(config, str(tmp_path))
    resumed = train.train_and_evaluate(config, str(tmp_path))
    assert init_stages == [0, 2]  # the second from the init stage's step 2
    (run_dir / 'result.json').unlink()
    again = train.train_and_evaluate(config, str(tmp_path))
  assert init_stages == [0, 2]
  assert again == json.loads(json.dumps(resumed))
  result, reference_dir, _ = reference
  for key in ('method', 'trains', 'epochs', 'steps', 'history'):
    assert resumed['init_stage'][key] == result['init_stage'][key], key
  assert resumed['history'] == result['history']
  want, got = _best_params(reference_dir), _best_params(run_dir)
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_two_devices_take_the_init_step_of_one_device_in_float64(tmp_path):
  """Data parallel (pmap over 2 CPU devices, in a process of its own): AB's init steps
  pmean the gradients and take the student's and the connectors' BatchNorm statistics
  over the global batch, so in float64 they differ from one device's by rounding only."""
  spec = {'devices': 2, 'x64_init_steps': ['ab'], 'out': str(tmp_path / 'x64')}
  info = run_worker(spec)
  assert info['device_count'] == 2
  diffs = info['diffs']
  assert {'ab/params', 'ab/batch_stats', 'ab/opt_state', 'ab/metrics'} <= set(diffs)
  assert all(d < 1e-12 for d in diffs.values()), diffs


@pytest.mark.parametrize('overrides,message', [
    ({'distill.ab.init_epochs': -1},
     r'config.distill.ab.init_epochs=-1 is not accepted; expected an integer >= 0'),
    ({'method': 'kd', 'distill.kd.init_epochs': 3},
     r"method 'kd' has no init stage \(init_terms\), so no config.distill.kd.init_epochs; "
     'methods with one: ab, fsp, ft'),
    ({'method': 'ab+fsp', 'distill.ab.init_epochs': 1, 'distill.fsp.init_epochs': 1},
     'one method of a run may have an init stage, not ab, fsp'),
])
def test_bad_init_stage_settings_are_refused_in_one_line(tmp_path, overrides, message):
  overrides = dict(overrides)
  config = tiny_config(overrides.pop('method', 'ab'))
  for key, value in overrides.items():
    _, name, field = key.split('.')
    config.distill[name][field] = value
  before = tree_listing(tmp_path)
  with data(), pytest.raises(ValueError, match=message) as error:
    train.train_and_evaluate(config, str(tmp_path))
  assert '\n' not in str(error.value)
  assert tree_listing(tmp_path) == before


@pytest.mark.parametrize('value', [1.5, True, '30', None])
def test_init_epochs_must_be_an_integer(value):
  with pytest.raises(ValueError, match=r'config.distill.ft.init_epochs=.* is not accepted; '
                     'expected an integer >= 0') as error:
    distiller.settings(methods.get('ft'), {'init_epochs': value})
  assert '\n' not in str(error.value)


def test_every_family_names_its_head():
  """The head an init stage leaves alone: every name a model's top-level module."""
  for name in ('resnet8', 'resnet_32_8', 'wrn_16_1', 'vgg8', 'MobileNetV2', 'ShuffleV2',
               'ResNet18'):
    model = models.create_model(name, 10)
    params = models.variable_shapes(model)['params']
    head = models.head_modules(model)
    assert set(head) <= set(params) and params[head[-1]]['kernel'].shape[-1] == 10, name
