"""The sweep: the grids' plans (no training) and the small grid end to end.

The end-to-end run uses real CIFAR-10 from KD_TFDS_DATA_DIR when it is set, mock
data otherwise.
"""
import contextlib
import json
import os
import subprocess
import sys

import pytest
import tensorflow_datasets as tfds

from kd_jax import rundir, standard, sweep, teachers, train
from tests.conftest import TFDS_DATA_DIR
from tests.conftest import tree_listing

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = ('base', 'logit', 'st', 'at', 'at+st', 'fsp')


def test_reference_grid_expands_to_its_cells_teachers_first(tmp_path):
  runs = sweep.plan('reference', str(tmp_path))
  cells = [run.cell for run in runs]
  assert len(runs) == len(set(cells)) == len({run.run_dir for run in runs}) == 6 * 2 * 2 * 3
  assert set(cells) == {sweep.Cell(m, d, sweep.resnet_32_pair(n), s) for m in METHODS
                        for d in ('cifar10', 'cifar100') for n in (20, 110) for s in (0, 1, 2)}
  # The four teachers (base, seed 0, per dataset and depth) come first.
  assert [run.role for run in runs] == ['teacher'] * 4 + ['cell'] * 68
  assert {run.cell for run in runs[:4]} == {sweep.Cell('base', d, sweep.resnet_32_pair(n), 0)
                                           for d in ('cifar10', 'cifar100') for n in (20, 110)}
  names = [run.name for run in runs]
  assert 'base_cifar100_resnet_32_110_seed0' in names[:4]
  assert 'at+st_cifar10_resnet_32_110_from_resnet_32_110_seed2' in names
  position = {name: i for i, name in enumerate(names)}
  for i, run in enumerate(runs):
    config = run.config
    assert config.seed == run.cell.seed and config.model == run.cell.student
    assert (config.method, config.dataset, config.num_epochs) == (
        run.cell.method, run.cell.dataset, 200)
    assert run.run_dir == os.path.join(str(tmp_path), rundir.run_name(config))
    assert run.status() == 'todo'
    if run.cell.method != 'base':
      # The student's teacher is the baseline cell of seed 0: the same run directory.
      teacher = teachers.teacher_config(config)
      assert position[rundir.run_name(teacher)] < i
      assert runs[position[rundir.run_name(teacher)]].role == 'teacher'
      assert rundir.run_identity(teacher) == rundir.run_identity(
          runs[position[rundir.run_name(teacher)]].config)
  assert runs[position['at+st_cifar100_resnet_32_20_from_resnet_32_20_seed1']].config.distill.st.weight \
      == 0.9


def test_subsets_and_capped_epochs(tmp_path):
  runs = sweep.plan('reference', str(tmp_path), methods=['st'], datasets=['cifar100'],
                    depths=[110], seeds=[1, 2], max_epochs=5, data_dir='/data/tfds')
  assert [run.name for run in runs] == [
      'base_cifar100_resnet_32_110_seed0_e5',  # the teacher, though seed 0 is not selected
      'st_cifar100_resnet_32_110_from_resnet_32_110_seed1_e5',
      'st_cifar100_resnet_32_110_from_resnet_32_110_seed2_e5']
  assert [run.role for run in runs] == ['teacher', 'cell', 'cell']
  assert all(run.config.num_epochs == 5 and run.config.data_dir == '/data/tfds' for run in runs)
  assert rundir.run_name(teachers.teacher_config(runs[1].config)) == runs[0].name

  # Baselines alone need no teacher; a cap above the grid's epochs changes nothing.
  runs = sweep.plan('small', str(tmp_path), methods=['base'], max_epochs=10)
  assert [(run.role, run.name) for run in runs] == [
      ('cell', 'base_cifar10_resnet_32_8_seed0_small'),
      ('cell', 'base_cifar10_resnet_32_8_seed1_small')]
  assert runs[0].config.num_epochs == 2 and runs[0].config.train_split == 'train[:512]'

  small = sweep.plan('small', str(tmp_path))
  assert [run.name for run in small][:2] == ['base_cifar10_resnet_32_8_seed0_small',
                                             'logit_cifar10_resnet_32_8_from_resnet_32_8_seed0_small']
  assert small[0].role == 'teacher' and len(small) == 8


@pytest.mark.parametrize('kwargs,message', [
    ({'grid_name': 'huge'}, "unknown grid 'huge'"),
    ({'methods': ['kdx']}, "unknown method 'kdx'"),
    ({'datasets': ['mnist']}, "unknown dataset 'mnist'; expected one of: cifar10, cifar100"),
    ({'depths': [21]}, "model 'resnet_32_21': depth 21 is not 6n\\+2"),
    ({'max_epochs': 0}, 'max_epochs=0'),
    ({'seeds': []}, 'the selection is empty'),
])
def test_bad_selections_are_refused(tmp_path, kwargs, message):
  kwargs = {'grid_name': 'small', **kwargs}
  with pytest.raises(ValueError, match=message):
    sweep.plan(workdir=str(tmp_path), **kwargs)
  assert not os.listdir(tmp_path)


def test_finished_runs_are_skipped_and_partial_ones_resumed(tmp_path, monkeypatch):
  runs = sweep.plan('small', str(tmp_path), methods=['base', 'st'])
  done, partial = runs[0], runs[1]
  os.makedirs(done.run_dir)
  with open(os.path.join(done.run_dir, 'result.json'), 'w') as f:
    json.dump({}, f)
  os.makedirs(partial.run_dir)
  with open(os.path.join(partial.run_dir, 'config.json'), 'w') as f:
    json.dump({}, f)
  assert [run.status() for run in runs] == ['done', 'partial', 'todo', 'todo']
  plan_text = sweep.format_plan(runs)
  assert plan_text.splitlines()[0].split() == ['done', 'teacher', done.run_dir]
  assert plan_text.splitlines()[-1] == '4 runs: 1 done, 1 partial, 2 todo'

  calls = []
  monkeypatch.setattr(train, 'train_and_evaluate',
                      lambda config, workdir: calls.append((rundir.run_name(config), workdir)))
  messages = []
  trained = sweep.run(runs, str(tmp_path), log=messages.append)
  assert trained == [run.name for run in runs[1:]]
  assert calls == [(run.name, str(tmp_path)) for run in runs[1:]]
  assert messages[:2] == [f'[1/4] done: {done.name}', f'[2/4] resuming: {partial.name}']


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path):
  proc = subprocess.run(
      [sys.executable, '-m', 'kd_jax.sweep', '--grid=reference', f'--workdir={tmp_path}/runs',
       '--methods=base,at', '--depths=110', '--seeds=0,1', '--dry_run'],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  lines = proc.stdout.strip().splitlines()
  assert lines[0].split() == ['todo', 'teacher', f'{tmp_path}/runs/base_cifar10_resnet_32_110_seed0']
  assert lines[-1] == '8 runs: 0 done, 0 partial, 8 todo'
  assert not os.listdir(tmp_path)


def _data():
  if TFDS_DATA_DIR:
    return contextlib.nullcontext()
  return tfds.testing.mock_data(num_examples=256)


def test_small_grid_end_to_end_then_rerun_trains_nothing(tmp_path, monkeypatch):
  workdir = str(tmp_path / 'runs')
  selection = dict(methods=['base', 'st'], seeds=[0], max_epochs=1)
  calls = []
  real_train_and_evaluate = train.train_and_evaluate

  def counted(config, root):
    calls.append(rundir.run_name(config))
    return real_train_and_evaluate(config, root)

  monkeypatch.setattr(train, 'train_and_evaluate', counted)
  runs = sweep.plan('small', workdir, data_dir=TFDS_DATA_DIR, **selection)
  with _data():
    sweep.run(runs, workdir, log=lambda _: None)
  # The teacher first, once; the students found it.
  assert calls == ['base_cifar10_resnet_32_8_seed0_small_e1',
                   'st_cifar10_resnet_32_8_from_resnet_32_8_seed0_small_e1']
  for run in runs:
    with open(os.path.join(run.run_dir, 'result.json')) as f:
      result = json.load(f)
    assert (result['seed'], result['epochs']) == (0, 1)
    assert result['num_test_images'] == 256

  # Rerunning trains nothing, in this process ...
  calls.clear()
  with _data():
    assert sweep.run(sweep.plan('small', workdir, **selection), workdir, log=lambda _: None) == []
  assert calls == []
  # ... or from the command line, which then writes the report.
  listing = tree_listing(workdir)
  proc = subprocess.run(
      [sys.executable, '-m', 'kd_jax.sweep', '--grid=small', f'--workdir={workdir}',
       '--methods=base,st', '--seeds=0', '--max_epochs=1'],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert '2 runs: 2 done, 0 partial, 0 todo' in proc.stdout
  assert 'training' not in proc.stdout and 'resuming' not in proc.stdout
  after = tree_listing(workdir)
  assert {k: v for k, v in after.items() if not k.startswith('report')} == listing
  report_dir = os.path.join(workdir, 'report')
  table = open(os.path.join(report_dir, 'table.md')).read()
  assert '| Method | CIFAR 10 8 >> 8 | avg |' in table
  assert all(f'| {label} |' in table for label in ('baseline', 'ST'))
  for png in ('curves_cifar10_resnet_32_8.png', 'bars.png'):
    assert os.path.getsize(os.path.join(report_dir, png)) > 1000


def test_seeds_of_a_cell_are_grouped_when_consecutive(tmp_path):
  runs = sweep.plan('reference', str(tmp_path), seeds=[0, 1, 2])
  groups = sweep.seed_groups(runs)
  assert sum(map(len, groups)) == len(runs) == 72
  # 4 teachers (base, seed 0) alone, the base cells' seeds 1-2, every other cell's 0-2.
  assert sorted(len(g) for g in groups) == [1] * 4 + [2] * 4 + [3] * 20
  for group in groups:
    assert len({(r.role, r.cell.method, r.cell.dataset, r.cell.pair) for r in group}) == 1
  assert [[r.cell.seed for r in g] for g in sweep.seed_groups(
      sweep.plan('small', str(tmp_path), methods=['st'], seeds=[0, 2, 3]))] == [[0], [0], [2, 3]]


def test_seeds_train_together_by_default_on_accelerators_only(monkeypatch):
  import jax  # pylint: disable=g-import-not-at-top
  for backend, together in (('cpu', False), ('gpu', True), ('tpu', True)):
    monkeypatch.setattr(jax, 'default_backend', lambda b=backend: b)
    assert sweep.seeds_together_by_default() == together


def test_standard_grid_plans_teachers_once_and_vanilla_students_once(tmp_path):
  runs = sweep.plan('cifar100_standard', str(tmp_path), methods=['base', 'kd', 'dkd'])
  teachers_ = [run for run in runs if run.role == 'teacher']
  # One teacher per teacher model, trained with its own recipe (lr 0.05), seed 0.
  assert sorted(run.config.model for run in teachers_) == sorted(
      {p.split('>>')[0] for p in standard.PAIRS})
  assert all(run.config.learning_rate == 0.05 and run.config.method == 'base'
             for run in teachers_)
  assert runs[:len(teachers_)] == teachers_
  names = [run.name for run in runs]
  assert len(names) == len(set(names))
  students = {p.split('>>')[1] for p in standard.PAIRS}
  # 13 pairs x 2 methods x 3 seeds + one vanilla run per student model and seed.
  assert len(runs) == len(teachers_) + 13 * 2 * 3 + len(students) * 3
  shuffle = [r for r in runs if r.name == 'kd_cifar100_ShuffleV1_from_wrn_40_2_seed1'][0]
  assert (shuffle.config.learning_rate, shuffle.config.batch_size, shuffle.config.num_epochs) == (
      0.01, 64, 240)
  dkd = [r for r in runs if r.name == 'dkd_cifar100_resnet20_from_resnet56_seed0'][0]
  assert dkd.config.distill.dkd.beta == standard.DKD_BETA['resnet56>>resnet20']


def test_standard_grid_plans_every_method_with_its_originals_settings(tmp_path):
  runs = sweep.plan('cifar100_standard', str(tmp_path), pairs=['resnet32x4>>resnet8x4'],
                    seeds=[0])
  cells = {r.config.method: r.config for r in runs if r.role == 'cell'}
  assert sorted(cells) == sorted(standard.METHODS)
  # Teacher in eval mode as both projects run it, but OFD's (train mode in mdistiller).
  assert {m for m, c in cells.items() if c.teacher.bn_mode == 'batch'} == {'ofd'}
  assert cells['fsp'].distill.fsp.form == 'repdistiller'
  # RepDistiller's two stages for AB, FT and FSP: 30 init epochs, then CE alone (AB, FSP)
  # or CE + 200 x FT; FT's init at lr 0.01 for a resnet student.
  assert {m for m, c in cells.items() if c.distill[m].get('init_epochs')} == {'ab', 'ft', 'fsp'}
  assert all(cells[m].distill[m].init_epochs == 30 for m in ('ab', 'ft', 'fsp'))
  assert (cells['ab'].distill.ab.weight, cells['fsp'].distill.fsp.weight,
          cells['ft'].distill.ft.weight) == (0.0, 0.0, 200.0)
  assert cells['ft'].distill.ft.init_learning_rate == 0.01
  assert cells['ab'].distill.ab.init_learning_rate is None  # the run's lr
  (capped,) = [r for r in sweep.plan('cifar100_standard', str(tmp_path), methods=['ab'],
                                     pairs=['resnet32x4>>resnet8x4'], seeds=[0], max_epochs=16)
               if r.role == 'cell']
  assert (capped.config.num_epochs, capped.config.distill.ab.init_epochs) == (16, 2)


def test_methods_grid_plans_one_teacher_then_every_method_on_the_small_split(tmp_path):
  runs = sweep.plan('methods_cifar10', str(tmp_path), data_dir='/data')
  assert [r.role for r in runs] == ['teacher'] + ['cell'] * 8
  assert runs[0].config.model == 'resnet56' and runs[0].config.learning_rate == 0.05
  assert [r.config.method for r in runs[1:]] == list(sweep.GRIDS['methods_cifar10'].methods)
  for r in runs:
    assert (r.config.train_split, r.config.num_epochs, r.config.data_dir) == (
        'train[:4000]', 6, '/data')
  dkd, = [r.config for r in runs if r.config.method == 'dkd']
  assert (dkd.distill.dkd.beta, dkd.distill.dkd.warmup) == (2.0, 20)  # mdistiller's, this pair


def test_published_teachers_are_imported_not_trained(tmp_path):
  published = tmp_path / 'cifar_teachers' / 'resnet32x4_vanilla'
  published.mkdir(parents=True)
  (published / 'ckpt_epoch_240.pth').write_bytes(b'')
  runs = sweep.plan('cifar100_standard', str(tmp_path / 'runs'), methods=['kd'],
                    pairs=['resnet32x4>>ShuffleV1', 'vgg13>>vgg8'], seeds=[0],
                    teachers_dir=str(tmp_path / 'cifar_teachers'))
  assert [(r.role, r.name) for r in runs] == [
      ('teacher', 'base_cifar100_vgg13_seed0'),  # not published here: trained
      ('cell', 'kd_cifar100_ShuffleV1_from_resnet32x4_seed0'),
      ('cell', 'kd_cifar100_vgg8_from_vgg13_seed0')]
  assert runs[1].config.teacher.checkpoint == str(published / 'ckpt_epoch_240.pth')
  with pytest.raises(ValueError, match="--teachers_dir='/nowhere' is not a directory"):
    sweep.plan('cifar100_standard', str(tmp_path), teachers_dir='/nowhere')


def test_dry_run_estimates_hours_from_the_benchmark(tmp_path):
  runs = sweep.plan('cifar100_standard', str(tmp_path), methods=['base', 'kd'],
                    pairs=['resnet32x4>>resnet8x4'], seeds=[0, 1])
  rows = [{'method': 'kd', 'teacher': 'resnet32x4', 'student': 'resnet8x4', 'batch': 64,
           'step_img_s': 600.0, 'e2e_img_s': 500.0},
          {'method': 'base', 'teacher': None, 'student': 'resnet32x4', 'batch': 64,
           'step_img_s': 240.0}]
  hours, notes = sweep.estimate_hours(runs, {'rows': rows})
  # teacher: 240 epochs x 50,000 / (240 x 5/6); 2 kd runs at 500/s; 2 base runs timed as kd.
  expected = 240 * 50000 * (1 / 200 + 2 / 500 + 2 / 500) / 3600
  assert abs(hours - expected) < 1e-9
  assert len(notes) == 2 and all('timed as another method' in n for n in notes)
  with pytest.raises(ValueError, match='no row for resnet32x4>>resnet8x4 at batch 64'):
    sweep.estimate_hours(runs, {'rows': rows[1:]})
  # AB in the standard config: 30 init epochs timed as kd, then CE alone, timed as the
  # student's base run.
  rows.append({'method': 'base', 'teacher': None, 'student': 'resnet8x4', 'batch': 64,
               'step_img_s': 1200.0})
  ab = sweep.plan('cifar100_standard', str(tmp_path), methods=['ab'],
                  pairs=['resnet32x4>>resnet8x4'], seeds=[0])
  hours, _ = sweep.estimate_hours([r for r in ab if r.role == 'cell'], {'rows': rows})
  assert abs(hours - 50000 * (30 / 500 + 240 / 1000) / 3600) < 1e-9
  proc = subprocess.run(
      [sys.executable, '-m', 'kd_jax.sweep', '--grid=cifar100_standard',
       f'--workdir={tmp_path}', '--methods=kd', "--pairs=resnet32x4>>resnet8x4", '--seeds=0',
       f'--benchmark={_write_json(tmp_path / "bench.json", {"rows": rows})}', '--dry_run'],
      cwd=REPO, capture_output=True, text=True, timeout=300, env=dict(os.environ, PYTHONPATH=REPO))
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert '2 runs: 0 done, 0 partial, 2 todo' in proc.stdout
  assert f'estimated time of the runs not done: {240 * 50000 * (1 / 200 + 1 / 500) / 3600:.1f} h' \
      in proc.stdout
  assert not [p for p in os.listdir(tmp_path) if p != 'bench.json']


def _write_json(path, value):
  path.write_text(json.dumps(value))
  return str(path)


def test_a_method_that_cannot_use_a_pair_is_skipped_before_anything_is_written(tmp_path):
  runs = sweep.plan('small', str(tmp_path), methods=['fsp'], pairs=['resnet8x4>>resnet_32_8'],
                    seeds=[0], data_dir=TFDS_DATA_DIR)
  runs = [r for r in runs if r.role == 'cell']
  log = []
  data = (contextlib.nullcontext() if TFDS_DATA_DIR
          else tfds.testing.mock_data(num_examples=256))
  with data:
    assert sweep.run(runs, str(tmp_path), log=log.append) == []
  assert "skipped: method 'fsp' cannot" in log[-1] and 'resnet8x4' in log[-1]
  assert not os.listdir(tmp_path)


def _save_published_teacher(teachers_dir, model_name, num_classes):
  """A random teacher saved as RepDistiller's train_teacher.py saves the published
  cifar_teachers files (the ones mdistiller downloads): {'epoch', 'model', 'accuracy',
  'optimizer'} with torch.save, at <model>_vanilla/ckpt_epoch_240.pth."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from kd_jax import models, torch_import  # pylint: disable=g-import-not-at-top
  model = models.create_model(model_name, num_classes)
  state = torch_import.flax_to_torch(models.init_variables(model, jax.random.key(7)), model)
  state = {k: torch.from_numpy(np.array(v)) for k, v in state.items()}
  optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.05, momentum=0.9)
  path = os.path.join(teachers_dir, f'{model_name}_vanilla', 'ckpt_epoch_240.pth')
  os.makedirs(os.path.dirname(path))
  torch.save({'epoch': 240, 'model': state, 'accuracy': 0.0,
              'optimizer': optimizer.state_dict()}, path)
  return path


@pytest.mark.parametrize('dataset,methods,seeds_together', [
    ('cifar100', ('base', 'kd'), False), ('cifar10', ('base', 'dkd'), True)])
def test_small_standard_grid_with_a_published_teacher_end_to_end(dataset, methods,
                                                                 seeds_together, tmp_path,
                                                                 monkeypatch):
  """The standard grid's machinery on tiny runs: a .pth teacher imported (not trained),
  two seeds of each method (one run each, or trained together), rerun trains nothing,
  the report equals the runs."""
  pytest.importorskip('torch')
  import csv  # pylint: disable=g-import-not-at-top
  import dataclasses  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from kd_jax import report  # pylint: disable=g-import-not-at-top
  pair = 'resnet14>>resnet8'
  monkeypatch.setitem(sweep.GRIDS, 'tiny_standard', dataclasses.replace(
      sweep.GRIDS['cifar100_standard'], methods=methods, datasets=(dataset,),
      pairs=(pair,), seeds=(0, 1), tag='tiny',
      overrides=(('train_split', 'train[:256]'), ('eval_split', 'test[:128]'),
                 ('num_epochs', 2), ('lr_boundaries', (1,)), ('eval_batch_size', 128))))
  teachers_dir = str(tmp_path / 'cifar_teachers')
  pth = _save_published_teacher(teachers_dir, 'resnet14', 100 if dataset == 'cifar100' else 10)
  workdir = str(tmp_path / 'runs')
  data_dir = TFDS_DATA_DIR if dataset == 'cifar10' else None  # mock data without it
  runs = sweep.plan('tiny_standard', workdir, data_dir=data_dir, teachers_dir=teachers_dir)
  # No teacher run: the published file is every student's teacher.
  assert [(r.role, r.config.method, r.cell.seed) for r in runs] == [
      ('cell', m, s) for s in (0, 1) for m in methods]
  assert all(r.config.teacher.checkpoint == pth for r in runs if r.config.method != 'base')
  groups = []
  real_train_runs = train.train_runs

  def recorded(config, root, *args):
    groups.append([rundir.run_name(c) for c in train.seed_configs(config)])
    return real_train_runs(config, root, *args)

  monkeypatch.setattr(train, 'train_runs', recorded)
  with contextlib.nullcontext() if data_dir else tfds.testing.mock_data(num_examples=256):
    trained = sweep.run(runs, workdir, log=lambda _: None, seeds_together=seeds_together)
    assert sorted(trained) == sorted(r.name for r in runs)
    listing = tree_listing(workdir)
    again = sweep.plan('tiny_standard', workdir, data_dir=data_dir, teachers_dir=teachers_dir)
    assert sweep.run(again, workdir, log=lambda _: None, seeds_together=seeds_together) == []
  # Each run trained once, no teacher; with seeds_together a cell's two seeds in one program.
  by_method = {m: [r.name for r in runs if r.config.method == m] for m in methods}
  assert groups == ([by_method[m] for m in methods] if seeds_together
                    else [[r.name] for r in runs])
  assert tree_listing(workdir) == listing
  assert not [d for d in os.listdir(workdir) if d.startswith('base_') and 'resnet14' in d]

  results = {}
  for r in runs:
    with open(os.path.join(r.run_dir, 'result.json')) as f:
      results[r.config.method, r.cell.seed] = json.load(f)
  out = report.write_report(workdir, str(tmp_path / 'report'), expected_seeds=2)
  with open(os.path.join(out, 'standard.csv')) as f:
    table = {row['method']: row for row in csv.DictReader(f)}
  assert sorted(table) == sorted(methods)
  for method, row in table.items():
    assert (row['dataset'], row['pair'], row['n'], row['seeds']) == (dataset, pair, '2', '0 1')
    for protocol, key in (('best', 'best_accuracy'), ('last', 'final_accuracy')):
      accuracies = [100 * results[method, s][key] for s in (0, 1)]
      assert float(row[f'{protocol}_mean']) == pytest.approx(np.mean(accuracies), abs=1e-4)
      assert float(row[f'{protocol}_std']) == pytest.approx(np.std(accuracies, ddof=1), abs=1e-4)
      vanilla = np.mean([100 * results['base', s][key] for s in (0, 1)])
      if method != 'base':
        assert float(row[f'{protocol}_gain']) == pytest.approx(np.mean(accuracies) - vanilla,
                                                               abs=1e-4)
    assert row['published'] == ''  # no published number for this pair
  wall = sum(result['wall_time_s'] for result in results.values())
  assert f'Cost: {len(runs)} runs, {wall / 3600:.2f} h of wall time' in open(
      os.path.join(out, 'standard.md')).read()
  assert os.path.getsize(os.path.join(out, 'gains.png')) > 1000
