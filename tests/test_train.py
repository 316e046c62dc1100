"""End-to-end runs of the training loop: files written, resume, teachers, bad input.

Runs use real CIFAR-10 from KD_TFDS_DATA_DIR when it is set (CI sets it), mock
data otherwise; every run is a tiny model on a few hundred images.
"""
import glob
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from kd_jax import checkpoints, steps, train
from tests.conftest import (REPO, TFDS_DATA_DIR, TINY_TEST_IMAGES, data, tiny_config,
                            tree_listing, wrapped_evaluate, write_tiny_cifar10)

def test_run_writes_summaries_checkpoints_result(tmp_path, monkeypatch):
  config = tiny_config()
  traces = []
  trace = steps.train_steps_on_device
  monkeypatch.setattr(steps, 'train_steps_on_device',
                      lambda *a, **kw: traces.append(1) or trace(*a, **kw))
  with data():
    result = train.train_and_evaluate(config, str(tmp_path))
  # One dispatch per epoch, one trace (and compile) for both: the first dispatch's
  # state has the layout of the dispatches' outputs (parallel.like_outputs).
  assert len(traces) == 1
  run_dir = tmp_path / train.run_name(config)
  assert run_dir.name == 'base_cifar10_resnet_32_8_seed0_smoke'
  on_disk = json.loads((run_dir / 'result.json').read_text())
  assert on_disk == json.loads(json.dumps(result))
  assert result['num_test_images'] == TINY_TEST_IMAGES and result['steps'] == 2 * 4
  assert result['best_accuracy'] == max(h['test_accuracy'] for h in result['history'])
  assert 0 <= result['best_accuracy'] <= 1 and result['train_images_per_s'] > 0
  assert json.loads((run_dir / 'config.json').read_text())['model'] == 'resnet_32_8'
  assert checkpoints.has_best(str(run_dir))
  variables, meta = checkpoints.restore_best(str(run_dir))
  assert meta['epoch'] == result['best_epoch'] and meta['num_classes'] == 10

  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  (events,) = glob.glob(str(run_dir / 'events.out.tfevents.*'))
  acc = event_accumulator.EventAccumulator(events, size_guidance={'tensors': 0})
  acc.Reload()
  tags = set(acc.Tags()['tensors'])
  assert {'train/loss', 'train/accuracy', 'test/loss', 'test/accuracy', 'learning_rate',
          'test/best_accuracy'} <= tags
  test_acc = [float(tf_event.tensor_proto.float_val[0]) if tf_event.tensor_proto.float_val
              else float(np.frombuffer(tf_event.tensor_proto.tensor_content, np.float32)[0])
              for tf_event in acc.Tensors('test/accuracy')]
  np.testing.assert_allclose(test_acc, [h['test_accuracy'] for h in result['history']], rtol=1e-6)


def test_dispatch_length_does_not_change_the_run(tmp_path):
  """4 steps per epoch as single-step dispatches, or as dispatches of up to 3 steps cut
  by checkpoints every 2 steps (2 + 2 per epoch) and at the epoch's end: the same run.
  On the tf.data feed, whose iterator must follow the cuts (the device feed's dispatches
  are checked against single steps in test_steps)."""
  with data():
    runs = [train.train_and_evaluate(
        tiny_config(input_pipeline='tfds', num_epochs=2, **kw), str(tmp_path / str(i)))
            for i, kw in enumerate([dict(steps_per_dispatch=1),
                                    dict(steps_per_dispatch=3, checkpoint_every_steps=2)])]
  assert runs[0]['steps'] == runs[1]['steps'] == 8
  for key in ('train_loss', 'test_loss', 'train_accuracy', 'test_accuracy'):
    np.testing.assert_allclose([h[key] for h in runs[1]['history']],
                               [h[key] for h in runs[0]['history']], rtol=1e-5, err_msg=key)


def test_resume_continues_from_the_saved_epoch(tmp_path):
  config = tiny_config(num_epochs=3)
  with data():
    reference = train.train_and_evaluate(config, str(tmp_path / 'uninterrupted'))

    calls = {'n': 0}

    def evaluate_then_die(evaluate, variables):
      calls['n'] += 1
      if calls['n'] == 2:  # after epoch 1's checkpoint, during epoch 2's evaluation
        raise KeyboardInterrupt
      return evaluate(variables)

    with wrapped_evaluate(evaluate_then_die), pytest.raises(KeyboardInterrupt):
      train.train_and_evaluate(config, str(tmp_path / 'interrupted'))
    run_dir = tmp_path / 'interrupted' / train.run_name(config)
    assert not (run_dir / 'result.json').exists()
    resumed = train.train_and_evaluate(config, str(tmp_path / 'interrupted'))

  assert resumed['steps'] == reference['steps'] == 12
  # Same data order and augmentation after resuming: the same numbers as one run.
  assert [h['test_accuracy'] for h in resumed['history']] == [
      h['test_accuracy'] for h in reference['history']]
  assert [h['train_loss'] for h in resumed['history']] == [
      h['train_loss'] for h in reference['history']]
  a, _ = checkpoints.restore_best(str(tmp_path / 'uninterrupted' / train.run_name(config)))
  b, _ = checkpoints.restore_best(str(run_dir))
  jax.tree.map(np.testing.assert_array_equal, a, b)

  # A finished run is not run again.
  with data():
    again = train.train_and_evaluate(config, str(tmp_path / 'interrupted'))
  assert again == json.loads(json.dumps(resumed))


def test_teacher_is_trained_once_and_reused(tmp_path, monkeypatch):
  runs = []
  real_train_and_evaluate = train.train_and_evaluate

  def recorded(config, workdir):
    runs.append(f'{config.method} {config.model}')
    return real_train_and_evaluate(config, workdir)

  monkeypatch.setattr(train, 'train_and_evaluate', recorded)
  with data():
    st = train.train_and_evaluate(tiny_config('st'), str(tmp_path))
    teacher_dir = tmp_path / 'base_cifar10_resnet_32_8_seed0_smoke'
    assert checkpoints.has_best(str(teacher_dir))
    listing = tree_listing(teacher_dir)
    at = train.train_and_evaluate(tiny_config('at'), str(tmp_path))
  # The first student trained its teacher; the second found it.
  assert runs == ['st resnet_32_8', 'base resnet_32_8', 'at resnet_32_8']
  assert tree_listing(teacher_dir) == listing
  assert st['teacher'] == at['teacher'] == 'resnet_32_8'
  assert st['name'] == 'st_cifar10_resnet_32_8_from_resnet_32_8_seed0_smoke'
  assert 'train_teacher_accuracy' in st['history'][0] and 'train_kd_at' in at['history'][0]


def _teacher_run(tmp_path):
  """A finished baseline run on mock CIFAR-10 (10 classes), to misuse as a teacher."""
  config = tiny_config(num_epochs=1, data_dir=None)
  with tfds.testing.mock_data(num_examples=256):
    train.train_and_evaluate(config, str(tmp_path / 'teachers'))
  return str(tmp_path / 'teachers' / train.run_name(config))


@pytest.mark.parametrize('overrides,message', [
    ({'model': 'resnet_32_21'}, "model 'resnet_32_21': depth 21 is not 6n\\+2"),
    ({'model': 'wide_resnet'}, "unknown model 'wide_resnet'"),
    ({'teacher.model': 'resnet_32_9', 'method': 'st'}, "model 'resnet_32_9': depth 9"),
    ({'dataset': 'mnist'}, "unknown dataset 'mnist'"),
    ({'method': 'hint'}, "unknown method 'hint'"),
    ({'batch_size': 512}, 'batch_size 512 is larger than the 256 examples'),
    ({'batch_size': 0}, 'config.batch_size=0'),
    ({'num_epochs': 0}, 'config.num_epochs=0'),
    ({'learning_rate': -0.1}, 'config.learning_rate=-0.1'),
    ({'compute_dtype': 'float16'}, "config.compute_dtype='float16'"),
    ({'teacher.bn_mode': 'eval'}, "config.teacher.bn_mode='eval'"),
    ({'data_dir': '/nonexistent/tfds'}, "data_dir '/nonexistent/tfds' does not exist"),
    ({'method': 'st', 'teacher.auto_train': False}, 'teacher.auto_train is False'),
    ({'method': 'st', 'teacher.checkpoint': '/nowhere/teacher.pth'},
     "teacher file '/nowhere/teacher.pth' does not exist"),
    ({'method': 'st', 'teacher.checkpoint': '/nowhere/run'},
     "teacher.checkpoint '/nowhere/run' is neither"),
    ({'method': 'at', 'teacher.model': 'resnet8'}, "method 'at' cannot compare"),
    ({'method': 'at+st', 'teacher.model': 'resnet20'}, "method 'at' cannot compare"),
])
def test_bad_input_is_refused_and_nothing_is_written(tmp_path, overrides, message):
  (tmp_path / 'keep.txt').write_text('a user file')
  before = tree_listing(tmp_path)
  with data(), pytest.raises(ValueError, match=message) as error:
    train.train_and_evaluate(tiny_config(**overrides), str(tmp_path))
  assert '\n' not in str(error.value)
  assert tree_listing(tmp_path) == before


@pytest.mark.parametrize('overrides,message', [
    ({'dataset': 'cifar100'}, "trained on 'cifar10' \\(10 classes.*'cifar100' has 100 classes"),
    ({'teacher.model': 'resnet_32_14'}, 'does not fit the model: missing'),
])
def test_teacher_that_does_not_fit_is_refused(tmp_path, overrides, message):
  teacher_dir = _teacher_run(tmp_path)
  config = tiny_config('st', **{'teacher.checkpoint': teacher_dir, 'data_dir': None, **overrides})
  before = tree_listing(tmp_path)
  with tfds.testing.mock_data(num_examples=256), pytest.raises(ValueError, match=message):
    train.train_and_evaluate(config, str(tmp_path))
  assert tree_listing(tmp_path) == before


def test_run_directory_of_another_config_is_refused(tmp_path):
  config = tiny_config(num_epochs=1)
  with data():
    train.train_and_evaluate(config, str(tmp_path))
    before = tree_listing(tmp_path)
    with pytest.raises(ValueError, match='holds a run with another config \\(differs in: '
                                         'learning_rate\\)'):
      train.train_and_evaluate(tiny_config(num_epochs=1, learning_rate=0.05), str(tmp_path))
  assert tree_listing(tmp_path) == before


def _main(*args, cwd):
  env = dict(os.environ, PYTHONPATH=REPO)
  return subprocess.run([sys.executable, os.path.join(REPO, 'main.py'), *args], cwd=cwd,
                        capture_output=True, text=True, env=env, timeout=600)


def test_main_reports_bad_input_in_one_line(tmp_path):
  proc = _main(f'--config={REPO}/configs/st_cifar100.py:smoke', '--workdir=runs',
               '--config.model=resnet_32_19', cwd=tmp_path)
  assert proc.returncode == 2
  errors = [line for line in proc.stderr.splitlines() if line.startswith('error:')]
  assert len(errors) == 1 and errors[0].startswith("error: model 'resnet_32_19': depth 19 is not 6n+2")
  assert 'Traceback' not in proc.stderr
  assert not os.listdir(tmp_path)


def test_main_smoke_run(tmp_path):
  """The smoke config from the command line: on real CIFAR-10 when given, otherwise on a
  prepared TFDS folder of as many random images (main.py runs in its own process, where
  mock data cannot reach)."""
  data_dir = TFDS_DATA_DIR or write_tiny_cifar10(tmp_path / 'tfds', {'train': 1024, 'test': 512})
  proc = _main(f'--config={REPO}/configs/base_cifar10.py:smoke', '--workdir=runs',
               f'--config.data_dir={data_dir}', '--config.num_epochs=1', cwd=tmp_path)
  assert proc.returncode == 0, proc.stderr[-2000:]
  result = json.loads((tmp_path / 'runs' / 'base_cifar10_resnet_32_8_seed0_smoke' /
                       'result.json').read_text())
  assert result['num_test_images'] == 512 and result['steps'] == 1024 // 64
  if TFDS_DATA_DIR:
    assert result['best_accuracy'] > 0.1  # above chance after one epoch on real images


def test_compile_time_is_measured_to_leave_it_out_of_images_per_s():
  """train_images_per_s leaves compilation out by JAX's compile events: they must fire."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  with train._CompileTime() as compile_time:  # pylint: disable=protected-access
    jax.jit(lambda x: jnp.sin(x) * 3.0)(jnp.ones(7)).block_until_ready()
  assert compile_time.seconds > 0
  seconds = compile_time.seconds
  jax.jit(lambda x: jnp.cos(x) * 5.0)(jnp.ones(9)).block_until_ready()
  assert compile_time.seconds == seconds  # no longer listening


def test_run_directory_of_an_earlier_kd_jax_is_refused_in_one_line(tmp_path):
  """Runs written before config.distill (they have config.kd) cannot resume."""
  config = tiny_config('st')
  run_dir = tmp_path / train.run_name(config)
  run_dir.mkdir()
  old = json.loads(config.to_json_best_effort())
  old.pop('distill')
  old['kd'] = {'temperature': 4.0, 'st_weight': 1.0}
  (run_dir / 'config.json').write_text(json.dumps(old))
  before = tree_listing(tmp_path)
  with pytest.raises(ValueError, match='written by an earlier kd_jax') as e:
    train.train_and_evaluate(config, str(tmp_path))
  assert '\n' not in str(e.value)
  assert tree_listing(tmp_path) == before


def test_epoch_metrics_average_each_key_over_the_steps_that_have_it():
  """An epoch resumed under a kd_jax that logs other metrics (e.g. AB at weight 0 after its
  init stage no longer logs kd_ab and teacher_accuracy) still ends."""
  steps_metrics = [{'loss': 1.0, 'kd_ab': 2.0, 'teacher_accuracy': 0.5}, {'loss': 3.0}]
  assert train._mean_metrics(steps_metrics) == {  # pylint: disable=protected-access
      'loss': 2.0, 'kd_ab': 2.0, 'teacher_accuracy': 0.5}
