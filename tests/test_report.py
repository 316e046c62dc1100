"""The report: numbers from hand-made result files, and from real short runs.

Real runs use CIFAR-10 from KD_TFDS_DATA_DIR when it is set, mock data otherwise.
"""
import contextlib
import csv
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs import default
from kd_jax import report, report_standard, rundir, standard, sweep, train
from tests.conftest import TFDS_DATA_DIR

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_run(workdir, method, dataset, depth, seed, best, num_test_images=10000,
              grid='reference', final=None, **overrides):
  """A hand-made finished run: config.json as train writes it, a matching result.json.
  `depth`: N for the reference grid's resnet_32_N pair, or a 'teacher>>student' pair."""
  pair = sweep.resnet_32_pair(depth) if isinstance(depth, int) else depth
  config = sweep.cell_config(sweep.GRIDS[grid], sweep.Cell(method, dataset, pair, seed))
  for key, value in overrides.items():
    config[key] = value
  run_dir = os.path.join(workdir, rundir.run_name(config))
  os.makedirs(run_dir)
  with open(os.path.join(run_dir, 'config.json'), 'w') as f:
    json.dump(json.loads(config.to_json_best_effort()), f)
  history = [{'epoch': e, 'test_accuracy': best * e / 3} for e in (1, 2, 3)]
  result = {'name': rundir.run_name(config), 'method': method, 'dataset': dataset,
            'model': config.model, 'teacher': None if method == 'base' else config.teacher.model,
            'seed': seed, 'best_accuracy': best, 'best_epoch': 3,
            'final_accuracy': best if final is None else final,
            'num_test_images': num_test_images, 'epochs': 3, 'steps': 30,
            'wall_time_s': 1.0, 'train_images_per_s': 100.0, 'device_kind': 'cpu',
            'device_count': 1, 'jax_version': '0', 'flax_version': '0',
            'config_hash': rundir.config_hash(config), 'history': history}
  with open(os.path.join(run_dir, 'result.json'), 'w') as f:
    json.dump(result, f)
  return run_dir


def table_rows(path):
  """{row label: [cells]} of the first Markdown table in `path`."""
  rows = {}
  for line in open(path).read().splitlines():
    if not line.startswith('|'):
      if rows:
        return rows
    elif not line.startswith('|---'):
      cells = [c.strip() for c in line.strip('|').split('|')]
      rows[cells[0]] = cells[1:]
  return rows


@pytest.fixture
def hand_made(tmp_path):
  workdir = str(tmp_path / 'runs')
  accuracies = {
      ('base', 'cifar10'): [0.91, 0.92, 0.93],
      ('st', 'cifar10'): [0.925, 0.935, 0.93],
      ('at', 'cifar10'): [0.91, 0.92],  # a seed missing
      ('base', 'cifar100'): [0.67, 0.68, 0.69],
      ('st', 'cifar100'): [0.70, 0.70, 0.70],
  }
  for (method, dataset), values in accuracies.items():
    for seed, best in enumerate(values):
      write_run(workdir, method, dataset, 20, seed, best)
  return workdir


def test_table_means_deltas_std_bold_and_missing_seeds(hand_made, tmp_path):
  out = report.write_report(hand_made, str(tmp_path / 'out'), expected_seeds=3)
  rows = table_rows(os.path.join(out, 'table.md'))
  assert rows['Method'] == ['CIFAR 10 20 >> 20', 'CIFAR 100 20 >> 20', 'avg']
  assert rows['baseline'] == ['92.0', '68.0', '80.0']
  assert rows['ST'] == ['**93.0(+1.0)**', '**70.0(+2.0)**', '**81.5(+1.5)**']
  assert rows['AT'] == ['91.5(-0.5) [n=2]', '—', '—']
  assert list(rows) == ['Method', 'baseline', 'ST', 'AT']
  text = open(os.path.join(out, 'table.md')).read()
  assert '[n=k]: mean of k runs, fewer than the expected 3.' in text
  assert '| ST | 93.0 / 92.8 (+0.2) | 70.0 / 69.9 (+0.1) |' in text  # beside the reference

  with open(os.path.join(out, 'table.csv')) as f:
    cells = {(r['method'], r['dataset']): r for r in csv.DictReader(f)}
  assert len(cells) == 5
  st = cells['st', 'cifar10']
  assert (st['n'], st['seeds'], st['teacher'], st['reference']) == ('3', '0 1 2', 'resnet_32_20',
                                                                     '92.8')
  assert float(st['mean']) == pytest.approx(93.0) and float(st['std']) == pytest.approx(0.5)
  assert float(st['delta_to_baseline']) == pytest.approx(1.0)
  assert float(st['diff_to_reference']) == pytest.approx(0.2)
  assert float(cells['base', 'cifar10']['std']) == pytest.approx(1.0)
  assert cells['base', 'cifar10']['delta_to_baseline'] == ''
  assert float(cells['at', 'cifar10']['mean']) == pytest.approx(91.5)
  assert cells['at', 'cifar10']['n'] == '2'
  assert float(cells['st', 'cifar100']['std']) == pytest.approx(0.0)
  with open(os.path.join(out, 'runs.csv')) as f:
    assert len(list(csv.DictReader(f))) == 14

  for name in ('curves_cifar10_resnet_32_20.png', 'curves_cifar100_resnet_32_20.png', 'bars.png'):
    with open(os.path.join(out, name), 'rb') as f:
      assert f.read(8) == b'\x89PNG\r\n\x1a\n'


def _refused(workdir, message):
  with pytest.raises(ValueError, match=message) as error:
    report.write_report(workdir, os.path.join(workdir, 'report'))
  assert not os.path.exists(os.path.join(workdir, 'report'))
  return error


def test_runs_of_another_config_are_refused(hand_made):
  write_run(hand_made, 'at', 'cifar10', 20, 2, 0.93, learning_rate=0.05)
  error = _refused(hand_made, 'refusing to average at_cifar10_resnet_32_20_from_resnet_32_20_seed0 '
                              'and at_cifar10_resnet_32_20_from_resnet_32_20_seed2: their configs '
                              'differ in learning_rate, not only in the seed')
  assert '\n' not in str(error.value)


def test_runs_evaluated_on_other_test_images_are_refused(hand_made):
  write_run(hand_made, 'at', 'cifar10', 20, 2, 0.93, num_test_images=9984)
  _refused(hand_made, 'evaluated on 10000 and 9984 test images')


def test_a_result_that_does_not_match_its_config_is_refused(hand_made):
  run_dir = write_run(hand_made, 'at', 'cifar10', 20, 2, 0.93)
  with open(os.path.join(run_dir, 'config.json')) as f:
    config = json.load(f)
  config['weight_decay'] = 5e-4
  with open(os.path.join(run_dir, 'config.json'), 'w') as f:
    json.dump(config, f)
  _refused(hand_made, 'result.json does not belong to .*config.json')


def test_the_same_seed_twice_is_refused(hand_made):
  write_run(hand_made, 'at', 'cifar10', 20, 1, 0.93, name='at_again')
  _refused(hand_made, 'the same seed 1 twice')


def test_tag_selects_runs(hand_made, tmp_path):
  write_run(hand_made, 'st', 'cifar10', 20, 0, 0.5, tag='e5', num_epochs=5)
  _refused(hand_made, 'differ in num_epochs, tag')
  out = report.write_report(hand_made, str(tmp_path / 'out'), expected_seeds=1, tag='e5')
  assert table_rows(os.path.join(out, 'table.md'))['ST'] == ['**50.0**', '**50.0**']


def tiny_config(method, seed):
  config = default.get_config('smoke', method=method, dataset='cifar10')
  config.train_split, config.eval_split = 'train[:256]', 'test[:200]'
  config.batch_size, config.eval_batch_size = 64, 128
  config.data_dir = TFDS_DATA_DIR
  config.seed = seed
  return config


def test_report_of_real_short_runs(tmp_path):
  workdir = str(tmp_path / 'runs')
  results = {}
  with contextlib.nullcontext() if TFDS_DATA_DIR else tfds.testing.mock_data(num_examples=256):
    for method in ('base', 'st'):  # st trains its teacher, base seed 0, first
      for seed in (0, 1):
        results[method, seed] = train.train_and_evaluate(tiny_config(method, seed), workdir)
  out = report.write_report(workdir, expected_seeds=2)
  assert out == os.path.join(workdir, 'report')

  with open(os.path.join(out, 'table.csv')) as f:
    cells = {r['method']: r for r in csv.DictReader(f)}
  means = {m: np.mean([100 * results[m, s]['best_accuracy'] for s in (0, 1)])
           for m in ('base', 'st')}
  stds = {m: np.std([100 * results[m, s]['best_accuracy'] for s in (0, 1)], ddof=1)
          for m in ('base', 'st')}
  # tfds.testing.mock_data ignores the slice: its 256 test examples are all evaluated.
  num_test_images = 200 if TFDS_DATA_DIR else 256
  for method in ('base', 'st'):
    assert cells[method]['n'] == '2'
    assert cells[method]['num_test_images'] == str(num_test_images)
    assert float(cells[method]['mean']) == pytest.approx(means[method], abs=1e-4)
    assert float(cells[method]['std']) == pytest.approx(stds[method], abs=1e-4)
  assert float(cells['st']['delta_to_baseline']) == pytest.approx(means['st'] - means['base'],
                                                                  abs=1e-4)
  rows = table_rows(os.path.join(out, 'table.md'))
  assert rows['baseline'][0].strip('*') == f"{means['base']:.1f}"
  delta = round(means['st'] - means['base'], 1)
  assert rows['ST'][0].strip('*') == (f"{means['st']:.1f}({'+' if delta >= 0 else '-'}"
                                      f'{abs(delta):.1f})')
  for name in ('curves_cifar10_resnet_32_8.png', 'bars.png'):
    assert os.path.getsize(os.path.join(out, name)) > 1000

  # A run of another config in the same cell is refused, naming both runs, on the
  # command line too.
  st1 = os.path.join(workdir, rundir.run_name(tiny_config('st', 1)))
  other = tiny_config('st', 2)
  other.distill.st.temperature = 2.0
  other_dir = os.path.join(workdir, rundir.run_name(other))
  shutil.copytree(st1, other_dir)
  with open(os.path.join(other_dir, 'config.json'), 'w') as f:
    json.dump(json.loads(other.to_json_best_effort()), f)
  with open(os.path.join(other_dir, 'result.json')) as f:
    result = json.load(f)
  result.update(seed=2, config_hash=rundir.config_hash(other))
  with open(os.path.join(other_dir, 'result.json'), 'w') as f:
    json.dump(result, f)
  proc = subprocess.run([sys.executable, '-m', 'kd_jax.report', f'--workdir={workdir}',
                         f'--out={tmp_path}/refused'], cwd=REPO, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines()[-1] == (
      f'error: refusing to average {os.path.basename(st1)[:-len("1_smoke")]}0_smoke and '
      f'{os.path.basename(other_dir)}: their configs differ in distill, not only in the seed')
  assert not os.path.exists(tmp_path / 'refused')


def test_report_imports_neither_jax_nor_tensorflow():
  """Making a table needs the run directories only (kd_jax.rundir), not the trainer."""
  code = ('import sys, kd_jax.report; '
          "print(sorted(m for m in ('jax', 'tensorflow', 'flax', 'orbax') if m in sys.modules))")
  proc = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True,
                        timeout=120, check=True)
  assert proc.stdout.strip() == '[]', proc.stdout


def test_standard_pairs_table_has_both_protocols_and_the_published_numbers(tmp_path):
  workdir = str(tmp_path / 'runs')
  pair = 'resnet32x4>>resnet8x4'
  for seed, (best, final) in enumerate([(0.73, 0.72), (0.74, 0.73)]):
    write_run(workdir, 'base', 'cifar100', pair, seed, best, grid='cifar100_standard',
              final=final)
  for seed, (best, final) in enumerate([(0.765, 0.76), (0.775, 0.77)]):
    write_run(workdir, 'kd', 'cifar100', pair, seed, best, grid='cifar100_standard',
              final=final)
  out = report.write_report(workdir, expected_seeds=2)
  with open(os.path.join(out, 'standard.csv')) as f:
    rows = {r['method']: r for r in csv.DictReader(f)}
  kd, base = rows['kd'], rows['base']
  assert kd['pair'] == pair and kd['n'] == '2' and kd['seeds'] == '0 1'
  assert abs(float(kd['best_mean']) - 77.0) < 1e-9 and abs(float(kd['last_mean']) - 76.5) < 1e-9
  assert abs(float(kd['best_std']) - np.std([76.5, 77.5], ddof=1)) < 1e-4
  assert abs(float(kd['best_gain']) - (77.0 - 73.5)) < 1e-9
  assert abs(float(kd['last_gain']) - (76.5 - 72.5)) < 1e-9
  # RepDistiller's KD number, last-epoch protocol: compared with our last epoch.
  assert (float(kd['published']), kd['published_protocol']) == (73.33, 'last')
  assert abs(float(kd['diff_to_published']) - (76.5 - 73.33)) < 1e-9
  assert float(base['published']) == 72.5 and base['best_gain'] == ''
  md = open(os.path.join(out, 'standard.md')).read()
  assert '| resnet32x4>>resnet8x4 | kd | 2 | 77.00 ± 0.71 | +3.50 | 76.50 ± 0.71 | +4.00 | ' \
         '73.33 (last, HobbitLong/RepDistiller) | +3.17 |' in md
  assert 'Cost: 4 runs, 0.00 h of wall time' in md
  assert os.path.getsize(os.path.join(out, 'gains.png')) > 1000
  assert '[standard.md](standard.md)' in open(os.path.join(out, 'table.md')).read()


def test_published_numbers_file_holds_the_issue_table():
  published = report_standard.load_published()
  assert published[('resnet32x4>>ShuffleV2', 'dkd')]['top1'] == 77.07
  assert published[('ResNet50>>vgg8', 'crd')]['top1'] == 74.30
  assert ('ResNet50>>vgg8', 'dkd') not in published
  for pair in standard.PAIRS:
    assert {'teacher', 'base', 'kd', 'crd'} <= {m for p, m in published if p == pair}
  assert {r['protocol'] for r in published.values()} == {'last', 'best'}
