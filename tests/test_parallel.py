"""Data parallelism on CPU: forced host devices and two local processes must compute
what one device computes on the same global batch."""
import json
import os
import socket

import numpy as np

from tests.conftest import TINY_TEST_IMAGES, run_worker, spawn_worker


def _run(spec):
  info = run_worker(spec)
  return dict(np.load(spec['out'])), info


def _assert_close(a, b, rtol):
  """||a - b|| <= rtol ||b|| over each run's params and each run's batch_stats.

  Per-array or elementwise bounds fail on arrays that start at zero (biases), whose
  few updates float32 rounding perturbs relatively much."""
  assert set(a) == set(b)
  groups = {k.split('/')[0] + '/' + k.split('/')[1] for k in a}  # '<run>/params' etc.
  for group in groups:
    keys = [k for k in a if k.startswith(group + '/')]
    diff = np.sqrt(sum(np.sum((a[k] - b[k])**2.0) for k in keys))
    norm = np.sqrt(sum(np.sum(b[k]**2.0) for k in keys))
    assert diff <= rtol * norm, (group, diff / norm)


def test_four_devices_step_as_one_device_in_float64(tmp_path):
  """Gradients, parameters, student and teacher BatchNorm statistics, metrics and eval
  sums: in float64 the only differences are summation order. CRD's memory banks and Z
  too: each device updates its banks with the whole batch, and draws the negatives of its
  examples as one device draws them."""
  spec = {'devices': 4, 'x64_steps': ['at+st', 'crd'], 'out': str(tmp_path / 'x64')}
  info = run_worker(spec)
  assert info['device_count'] == 4
  diffs = info['diffs']
  assert diffs.pop('eval_count') == 11
  assert all(d < 1e-10 for d in diffs.values()), diffs


def test_four_devices_train_as_one_device(tmp_path):
  """End to end in float32. Training amplifies float32 rounding (dead BatchNorm channels,
  lr 0.1), so this compares a short, gentle run; the float64 test above is the tight one."""
  runs = [{'method': 'base', 'num_epochs': 1, 'learning_rate': 0.02}]
  one, one_info = _run({'devices': 1, 'workdir': str(tmp_path / 'one'), 'runs': runs,
                        'out': str(tmp_path / 'one.npz')})
  four, four_info = _run({'devices': 4, 'workdir': str(tmp_path / 'four'), 'runs': runs,
                          'out': str(tmp_path / 'four.npz')})
  assert (one_info['device_count'], four_info['device_count']) == (1, 4)
  # Parameters and BatchNorm statistics after 4 SGD steps (with a teacher: the x64 test).
  assert any('batch_stats' in k for k in one)
  _assert_close(four, one, rtol=1e-3)
  for r1, r4 in zip(one_info['results'], four_info['results']):
    assert r1['num_test_images'] == r4['num_test_images'] == TINY_TEST_IMAGES  # each once
    for h1, h4 in zip(r1['history'], r4['history']):
      assert abs(h1['train_loss'] - h4['train_loss']) < 1e-4 * abs(h1['train_loss'])
      assert abs(h1['test_accuracy'] - h4['test_accuracy']) <= 2 / TINY_TEST_IMAGES + 1e-9
    assert r4['device_count'] == 4


def test_batch_not_divisible_by_the_devices_is_refused(tmp_path):
  proc = spawn_worker({'devices': 3, 'workdir': str(tmp_path), 'runs': [{'method': 'base'}],
                 'out': str(tmp_path / 'x.npz')})
  output, _ = proc.communicate(timeout=600)
  assert proc.returncode != 0
  assert 'config.batch_size=64 is not divisible by the 3 devices' in output
  assert not os.listdir(tmp_path)


def test_two_processes_agree_and_only_process_0_writes(tmp_path):
  with socket.socket() as s:
    s.bind(('localhost', 0))
    port = s.getsockname()[1]
  specs = [{'devices': 1, 'workdir': str(tmp_path / 'runs'), 'runs': [{'method': 'base'}],
            'out': str(tmp_path / f'p{i}.npz'), 'num_processes': 2, 'process_id': i,
            'port': port} for i in range(2)]
  procs = [spawn_worker(spec) for spec in specs]
  outputs = [p.communicate(timeout=600)[0] for p in procs]
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-3000:]
  (p0, info0), (p1, info1) = [(dict(np.load(s['out'])), json.load(open(s['out'] + '.json')))
                              for s in specs]
  assert (info0['device_count'], info1['process_index']) == (2, 1)
  for key in p0:
    np.testing.assert_array_equal(p0[key], p1[key], err_msg=key)
  run_dir = tmp_path / 'runs' / 'base_cifar10_resnet_32_8_seed0_smoke'
  events = [f for f in os.listdir(run_dir) if f.startswith('events.out.tfevents')]
  assert len(events) == 1  # process 1 only logs
  result = json.loads((run_dir / 'result.json').read_text())
  assert result['process_count'] == 2 and result['device_count'] == 2
  assert result['steps'] == info1['results'][0]['steps']
