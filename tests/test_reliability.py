"""Reliability: kill -9 and resume, SIGTERM, determinism, non-finite steps, config
changes, unwritable workdirs, failed saves."""
import json
import os
import random
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from kd_jax import checkpoints, train
from tests.conftest import REPO, data, finish_worker, spawn_worker, tiny_config, tree_listing

STEPS_PER_EPOCH, EPOCHS = 4, 3  # tiny_config: 256 images, batch 64


def _spawn(workdir, out, **overrides):
  return spawn_worker({'devices': 1, 'workdir': str(workdir), 'out': str(out),
                       'runs': [{'num_epochs': EPOCHS, **overrides}]})


def _saved_steps(run_dir):
  path = os.path.join(run_dir, 'checkpoints')
  return sorted(int(d) for d in os.listdir(path) if d.isdigit()) if os.path.isdir(path) else []


def _outputs(out):
  with open(f'{out}.json') as f:
    (result,) = json.load(f)['results']
  return dict(np.load(out)), result


def _assert_same_run(a, b):
  (params_a, result_a), (params_b, result_b) = a, b
  assert set(params_a) == set(params_b)
  for key in params_a:
    np.testing.assert_array_equal(params_a[key], params_b[key], err_msg=key)
  for h_a, h_b in zip(result_a['history'], result_b['history'], strict=True):
    assert {k: v for k, v in h_a.items()} == {k: v for k, v in h_b.items()}


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
  tmp = tmp_path_factory.mktemp('uninterrupted')
  finish_worker(_spawn(tmp / 'runs', tmp / 'out.npz', checkpoint_every_steps=1))
  return _outputs(tmp / 'out.npz')


def test_kill_9_anywhere_then_resume_gives_the_uninterrupted_result(tmp_path, uninterrupted):
  """SIGKILL right after checkpoints of several steps appear: mid-epoch, at epoch ends
  (during evaluation and the best checkpoint's save) and while the next step's
  checkpoint is being written; every rerun resumes, the last one finishes."""
  rng = random.Random(0)
  run_dir = tmp_path / 'runs' / train.run_name(tiny_config())
  kills = []
  for target in (2, 4, 9):
    proc = _spawn(tmp_path / 'runs', tmp_path / 'out.npz', checkpoint_every_steps=1)
    while not _saved_steps(run_dir) or _saved_steps(run_dir)[-1] < target:
      assert proc.poll() is None, proc.communicate()[0][-3000:]
      time.sleep(0.02)
    time.sleep(rng.uniform(0, 0.3))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    kills.append(_saved_steps(run_dir)[-1])
  assert kills == sorted(kills) and kills[-1] < STEPS_PER_EPOCH * EPOCHS
  finish_worker(_spawn(tmp_path / 'runs', tmp_path / 'out.npz', checkpoint_every_steps=1))
  _assert_same_run(_outputs(tmp_path / 'out.npz'), uninterrupted)


def test_sigterm_saves_mid_epoch_and_resumes_exactly(tmp_path, uninterrupted):
  run_dir = tmp_path / 'runs' / train.run_name(tiny_config())
  proc = _spawn(tmp_path / 'runs', tmp_path / 'out.npz', checkpoint_every_steps=5)
  while not _saved_steps(run_dir):  # the first checkpoint: step 4, the end of epoch 1
    assert proc.poll() is None, proc.communicate()[0][-3000:]
    time.sleep(0.02)
  proc.send_signal(signal.SIGTERM)
  output, _ = proc.communicate(timeout=600)
  assert proc.returncode != 0 and 'stopped by SIGTERM' in output, output[-3000:]
  assert _saved_steps(run_dir)[-1] > 4 or 'after epoch 1' in output
  finish_worker(_spawn(tmp_path / 'runs', tmp_path / 'out.npz', checkpoint_every_steps=5))
  _assert_same_run(_outputs(tmp_path / 'out.npz'), uninterrupted)


def _variables(run_dir):
  variables, _ = checkpoints.restore_best(str(run_dir))
  return variables


def test_same_seed_is_bit_identical_other_seeds_differ(tmp_path):
  with data():
    a = train.train_and_evaluate(tiny_config(), str(tmp_path / 'a'))
    b = train.train_and_evaluate(tiny_config(), str(tmp_path / 'b'))
    c = train.train_and_evaluate(tiny_config(seed=1), str(tmp_path / 'a'))
  assert a['history'] == b['history'] and a['config_hash'] == b['config_hash']
  name = train.run_name(tiny_config())
  jax.tree.map(np.testing.assert_array_equal, _variables(tmp_path / 'a' / name),
               _variables(tmp_path / 'b' / name))
  assert c['history'][0]['train_loss'] != a['history'][0]['train_loss']
  assert c['config_hash'] != a['config_hash']


def test_non_finite_step_stops_and_the_last_checkpoint_restores(tmp_path):
  config = tiny_config(learning_rate=1e6, checkpoint_every_steps=1)
  with data(), pytest.raises(train.NonFiniteError,
                             match=r'non-finite training step (\d+) \(epoch 1\): \w+=-?(nan|inf)') as e:
    train.train_and_evaluate(config, str(tmp_path))
  bad_step = int(e.value.args[0].split('step ')[1].split()[0])
  run_dir = tmp_path / train.run_name(config)
  assert _saved_steps(run_dir)[-1] == bad_step - 1
  assert f'the last checkpoint (step {bad_step - 1})' in str(e.value)
  with data():  # the same command stops at the same step, from the good checkpoint
    with pytest.raises(train.NonFiniteError, match=f'step {bad_step} '):
      train.train_and_evaluate(config, str(tmp_path))


def test_non_finite_steps_can_be_skipped(tmp_path):
  with data():
    result = train.train_and_evaluate(
        tiny_config(learning_rate=1e6, skip_nonfinite_steps=True), str(tmp_path))
  assert result['skipped_steps'] > 0
  variables = _variables(tmp_path / result['name'])
  assert all(np.all(np.isfinite(v)) for v in jax.tree.leaves(variables))


def test_changed_config_refused_restarted_or_resumed(tmp_path):
  config = tiny_config(num_epochs=1)
  run_dir = tmp_path / train.run_name(config)
  with data():
    train.train_and_evaluate(config, str(tmp_path))
    longer = tiny_config(num_epochs=2)
    before = tree_listing(tmp_path)
    with pytest.raises(ValueError, match=r'differs in: num_epochs\).*--if_config_differs'):
      train.train_and_evaluate(longer, str(tmp_path))
    assert tree_listing(tmp_path) == before

    resumed = train.train_and_evaluate(longer, str(tmp_path), if_config_differs='resume')
    assert [h['epoch'] for h in resumed['history']] == [1, 2]
    assert resumed['steps'] == 2 * STEPS_PER_EPOCH
    assert any(f.startswith('config.replaced-') for f in os.listdir(run_dir))

    restarted = train.train_and_evaluate(config, str(tmp_path), if_config_differs='restart')
  assert restarted['steps'] == STEPS_PER_EPOCH
  kept = [d for d in os.listdir(tmp_path) if d.startswith(run_dir.name + '.replaced-')]
  assert len(kept) == 1  # the old run is moved aside, not deleted
  assert json.loads((tmp_path / kept[0] / 'result.json').read_text())['steps'] == 8


def test_workdir_that_is_a_file_is_refused(tmp_path):
  (tmp_path / 'runs').write_text('not a directory')
  with pytest.raises(ValueError, match="workdir '.*runs' exists and is not a directory"):
    train.train_and_evaluate(tiny_config(), str(tmp_path / 'runs'))


def test_read_only_workdir_is_refused(tmp_path, monkeypatch):
  # Root writes through permission bits, so CI (root) cannot make a real read-only
  # folder: the permission check itself is made to say no.
  monkeypatch.setattr(train.os, 'access', lambda path, mode: False)
  with pytest.raises(ValueError, match=r"workdir '.*runs' is not writable \('.*' is read-only\)"):
    train.train_and_evaluate(tiny_config(), str(tmp_path / 'runs'))
  assert not os.listdir(tmp_path)


def test_failed_save_is_reported_and_the_previous_checkpoint_stays_valid(tmp_path, monkeypatch):
  saves = {'n': 0}
  real_save = checkpoints.RunCheckpoints._save  # pylint: disable=protected-access

  def full_disk_on_fourth_save(manager, step, **items):  # steps 0, 1, 2, then 3 fails
    saves['n'] += 1
    if saves['n'] == 4:
      raise checkpoints.CheckpointError(
          f'cannot save the checkpoint of step {step}: No space left on device; '
          'the previous checkpoint is intact') from OSError(28, 'No space left on device')
    return real_save(manager, step, **items)

  monkeypatch.setattr(checkpoints.RunCheckpoints, '_save', staticmethod(full_disk_on_fourth_save))
  config = tiny_config(checkpoint_every_steps=1)
  with data(), pytest.raises(checkpoints.CheckpointError, match='No space left on device'):
    train.train_and_evaluate(config, str(tmp_path))
  run_dir = tmp_path / train.run_name(config)
  assert _saved_steps(run_dir) == [1, 2]  # the last two
  monkeypatch.undo()
  with data():  # the same command resumes from that checkpoint and finishes
    result = train.train_and_evaluate(config, str(tmp_path))
  assert result['steps'] == 2 * STEPS_PER_EPOCH


def test_orbax_os_errors_become_checkpoint_errors(tmp_path, monkeypatch):
  manager = checkpoints.RunCheckpoints(str(tmp_path))

  def no_space(*args, **kwargs):
    raise OSError(28, 'No space left on device')

  monkeypatch.setattr(manager.latest, 'save', no_space)
  with pytest.raises(checkpoints.CheckpointError,
                     match='cannot save the checkpoint of step 7 .*No space left on device; '
                           'the previous checkpoint is intact'):
    manager.save_latest(7, {'x': np.zeros(2)}, {'epoch': 0})


@pytest.mark.parametrize('args,message', [
    (['--config.foo=1'], "unknown config field 'foo' in --config.foo=1"),
    (['--config.teacher.bn_mod=batch'], "did you mean 'bn_mode'"),
    (['--config.batch_size=abc'], "flag --config.batch_size=abc: invalid literal"),
    (['--config.num_epochs=0'], 'config.num_epochs=0 is not accepted'),
])
def test_main_refuses_bad_overrides_in_one_line(tmp_path, args, message):
  proc = subprocess.run([sys.executable, os.path.join(REPO, 'main.py'),
                         f'--config={REPO}/configs/base_cifar10.py:smoke', '--workdir=runs', *args],
                        cwd=tmp_path, capture_output=True, text=True, timeout=300,
                        env=dict(os.environ, PYTHONPATH=REPO))
  assert proc.returncode == 2
  errors = [line for line in proc.stderr.splitlines() if line.startswith('error:')]
  assert len(errors) == 1 and message in errors[0], proc.stderr[-2000:]
  assert 'Traceback' not in proc.stderr
  assert not os.listdir(tmp_path)
