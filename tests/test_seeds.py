"""Several seeds trained together (config.num_seeds, jax.vmap over students): each run
is the run its seed gives alone, in the same directory, and a group resumes exactly."""
import os

import jax
import numpy as np
import pytest

from kd_jax import checkpoints, models, teachers, train
from tests.conftest import data, tiny_config, tree_listing


class Killed(Exception):
  pass


def flat(params):
  return np.concatenate([np.ravel(x) for x in jax.tree.leaves(params)])


def best_params(result, workdir):
  variables, _ = checkpoints.restore_best(str(workdir / result['name']))
  return flat(variables['params'])


def initial_params(config, seed):
  model = models.create_model(config.model, 10)
  return flat(models.init_variables(model, jax.random.key(seed))['params'])


def rel(a, b):
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_seeds_trained_together_are_the_separate_runs(tmp_path):
  together, alone = tmp_path / 'together', tmp_path / 'alone'
  # A small learning rate keeps the float32 rounding of the two programs from growing.
  settings = dict(num_epochs=1, learning_rate=1e-3)
  config = tiny_config('st', num_seeds=2, seed=3, **settings)
  # The separate runs distil from the teacher the group trained first.
  teacher_dir = str(together / train.run_name(teachers.teacher_config(config)))
  with data():
    group = train.train_runs(config, str(together))
    single = [train.train_and_evaluate(tiny_config('st', seed=s, **settings, **{
        'teacher.checkpoint': teacher_dir}), str(alone)) for s in (3, 4)]
    # Finished runs are read back, not trained again.
    assert train.train_runs(config, str(together)) == group

  assert [r['name'] for r in group] == [r['name'] for r in single]
  assert [r['seed'] for r in group] == [3, 4]
  updates = {}
  for g, s in zip(group, single):
    start = initial_params(config, g['seed'])
    updates[g['seed']] = best_params(g, together) - start
    # float32 steps in another program (vmapped) round differently: close, not equal
    # (the rounding of the parameters is about 0.5% of these small updates).
    assert rel(updates[g['seed']], best_params(s, alone) - start) < 0.02
    for key in ('train_loss', 'test_loss', 'test_accuracy'):
      np.testing.assert_allclose(g['history'][-1][key], s['history'][-1][key], rtol=1e-4)
  # ... while another seed's data order and augmentation give another update altogether.
  assert rel(updates[3], updates[4]) > 0.5


def test_group_stopped_between_its_runs_saves_resumes_exactly(tmp_path, monkeypatch):
  config = tiny_config('base', num_seeds=2, num_epochs=2, checkpoint_every_steps=3)
  with data():
    reference = train.train_runs(config, str(tmp_path / 'reference'))

    real_save = checkpoints.RunCheckpoints.save_latest

    def save_then_die(self, step, state, meta):
      if step == 6 and 'seed1' in self.latest.directory.as_posix():
        raise Killed('between the two runs\' saves of step 6')
      real_save(self, step, state, meta)

    monkeypatch.setattr(checkpoints.RunCheckpoints, 'save_latest', save_then_die)
    with pytest.raises(Killed):
      train.train_runs(config, str(tmp_path / 'stopped'))
    saved = [sorted(int(d) for d in os.listdir(tmp_path / 'stopped' / r['name'] / 'checkpoints')
                    if d.isdigit()) for r in reference]
    assert saved == [[4, 6], [3, 4]]  # seed 1 missed step 6: both go back to step 4
    monkeypatch.setattr(checkpoints.RunCheckpoints, 'save_latest', real_save)
    resumed = train.train_runs(config, str(tmp_path / 'stopped'))

  for a, b in zip(resumed, reference):
    assert a['history'] == b['history'] and a['steps'] == b['steps'] == 8
    np.testing.assert_array_equal(best_params(a, tmp_path / 'stopped'),
                                  best_params(b, tmp_path / 'reference'))


def test_group_with_a_run_that_cannot_go_back_is_refused(tmp_path, monkeypatch):
  """Seed 0, stopped alone at step 8 (steps 4 and 8 kept, step 0 gone), cannot join a
  fresh seed 1 at step 0: refused in one line, nothing written."""
  real_save = checkpoints.RunCheckpoints.save_latest

  def die_at_step_12(self, step, state, meta):
    if step == 12:
      raise Killed('at step 12')
    real_save(self, step, state, meta)

  with data():
    monkeypatch.setattr(checkpoints.RunCheckpoints, 'save_latest', die_at_step_12)
    with pytest.raises(Killed):
      train.train_and_evaluate(tiny_config('base', num_epochs=3), str(tmp_path))
    monkeypatch.setattr(checkpoints.RunCheckpoints, 'save_latest', real_save)
    before = tree_listing(tmp_path)
    with pytest.raises(ValueError, match=r'at different steps \(\S+seed0\S*: 8, \S+seed1\S*: 0\) '
                       r'and \S+seed0\S* has no checkpoint of step 0; train them separately'):
      train.train_runs(tiny_config('base', num_epochs=3, num_seeds=2), str(tmp_path))
  assert tree_listing(tmp_path) == before


@pytest.mark.parametrize('overrides,message', [
    ({'num_seeds': 0}, 'config.num_seeds=0 is not accepted'),
    ({'num_seeds': 2, 'input_pipeline': 'tfds'}, "1 with input_pipeline='tfds'"),
    ({'num_seeds': 2, 'name': 'mine'}, '1 with a run name'),
])
def test_bad_num_seeds_is_refused(overrides, message):
  with pytest.raises(ValueError, match=message):
    train.validate_config(tiny_config(**overrides))
