"""Runs a grid of experiments resumably: the reference's table, the field's CIFAR-100 table.

  python -m kd_jax.sweep --grid=reference --workdir=runs/reference
  python -m kd_jax.sweep --grid=cifar100_standard --workdir=runs/standard \
      [--teachers_dir=cifar_teachers] [--benchmark=bench.json] --dry_run
  python -m kd_jax.sweep --grid=small --workdir=runs/small --data_dir=../shared/tfds
  python -m kd_jax.sweep --grid=methods_cifar10 --workdir=runs/methods --data_dir=../shared/tfds
  python -m kd_jax.sweep --grid=reference --workdir=runs/ref --methods=st,at --depths=20 \
      --seeds=0 --max_epochs=5 --dry_run

A grid is methods x datasets x pairs (teacher>>student) x seeds; a cell is one run of
the grid's config (`configs/<method>_<dataset>.py:depth=N` for the reference grid,
`configs/cifar100_standard.py:method=,pair=,dataset=` for the standard one) with `seed`
set, in its own run directory under --workdir (named by `rundir.run_name`). The plan
lists every teacher first (the baseline run of the teacher's model with `teacher.seed`,
shared by every student that needs it; in the reference grid it is also the baseline
row's seed-0 run), then the other cells, seed by seed. With --teachers_dir holding the
published `<model>_vanilla/ckpt_epoch_240.pth` files, a teacher found there is imported
instead of trained. A cell whose run directory holds result.json is done and skipped;
an interrupted one resumes from its last epoch; a method that cannot distil a pair
(e.g. FSP between different channel counts) is reported and skipped. Rerunning the same
command finishes the grid. When the grid is done, the report (kd_jax.report) is
written to <workdir>/report. --dry_run prints the plan, each run's status and, with
--benchmark (the JSON of `python -m kd_jax.benchmark`), the estimated hours.

Cells run one after another in this process (no subprocess per cell: each would pay
TensorFlow's and JAX's start-up, and the loop already resumes after a crash). With
--seeds_together (the default where JAX's backend is an accelerator) the consecutive
seeds of a cell train in one program (config.num_seeds, jax.vmap over students), in the
same run directories.
"""
import dataclasses
import json
import os
import re
import sys
from typing import Callable, List, Optional, Sequence, Tuple

import ml_collections

from configs import cifar100_standard, default
from kd_jax import methods as methods_lib, rundir, standard, teachers, train
from kd_jax.methods import distiller


def resnet_32_pair(depth: int) -> str:
  return f'resnet_32_{depth}>>resnet_32_{depth}'


@dataclasses.dataclass(frozen=True)
class Grid:
  methods: Tuple[str, ...]
  datasets: Tuple[str, ...]
  pairs: Tuple[str, ...]  # 'teacher>>student'
  seeds: Tuple[int, ...]
  config: str = 'reference'  # 'reference' (configs/default.py) or 'standard'
  smoke: bool = False  # start from the configs' `:smoke` settings
  tag: str = ''  # config.tag of every run (the run directories' suffix)
  overrides: Tuple[Tuple[str, object], ...] = ()  # (config field, value)


GRIDS = {
    # The reference's results table: 6 methods, CIFAR-10/100, ResNet-20 >> 20 and
    # ResNet-110 >> 110, 3 runs each (200 epochs; hours per run on a GPU).
    'reference': Grid(methods=('base', 'logit', 'st', 'at', 'at+st', 'fsp'),
                      datasets=('cifar10', 'cifar100'), pairs=(resnet_32_pair(20),
                                                              resnet_32_pair(110)),
                      seeds=(0, 1, 2)),
    # The field's table (RepDistiller, mdistiller): the 13 standard pairs on CIFAR-100,
    # 240 epochs each; 'base' is the vanilla student every gain is measured against.
    'cifar100_standard': Grid(methods=standard.METHODS, datasets=('cifar100',),
                              pairs=standard.PAIRS, seeds=(0, 1, 2), config='standard'),
    # A few minutes on a CPU: ResNet-8 >> 8 on 512 CIFAR-10 images, 2 epochs.
    'small': Grid(methods=('base', 'logit', 'st', 'at'), datasets=('cifar10',),
                  pairs=(resnet_32_pair(8),), seeds=(0, 1), smoke=True, tag='small',
                  overrides=(('train_split', 'train[:512]'), ('eval_split', 'test[:256]'),
                             ('num_epochs', 2), ('batch_size', 64), ('eval_batch_size', 256))),
    # The field's methods side by side in ~30 minutes on a CPU: ResNet-56 >> ResNet-20
    # with the standard recipe and each method's own settings (DKD's and ReviewKD's
    # 20-epoch warm-ups included), on 4,000 CIFAR-10 images for 6 epochs.
    'methods_cifar10': Grid(
        methods=('base', 'kd', 'dkd', 'dist', 'fitnet', 'at', 'crd', 'reviewkd'),
        datasets=('cifar10',), pairs=('resnet56>>resnet20',), seeds=(0,), config='standard',
        tag='methods', overrides=(('train_split', 'train[:4000]'), ('eval_split', 'test[:2000]'),
                                  ('num_epochs', 6), ('lr_boundaries', (5,)),
                                  ('eval_batch_size', 500))),
}


@dataclasses.dataclass(frozen=True)
class Cell:
  method: str
  dataset: str
  pair: str  # 'teacher>>student'
  seed: int

  @property
  def teacher(self) -> str:
    return self.pair.split('>>')[0]

  @property
  def student(self) -> str:
    return self.pair.split('>>')[1]


@dataclasses.dataclass
class PlannedRun:
  role: str  # 'teacher' (trained first; also a baseline cell) or 'cell'
  cell: Cell
  config: ml_collections.ConfigDict
  run_dir: str

  @property
  def name(self) -> str:
    return os.path.basename(self.run_dir)

  def status(self) -> str:
    """'done' (result.json written), 'partial' (started, not finished) or 'todo'."""
    if os.path.exists(os.path.join(self.run_dir, rundir.RESULT_FILE)):
      return 'done'
    if os.path.isdir(self.run_dir) and os.listdir(self.run_dir):
      return 'partial'
    return 'todo'


def get_grid(name: str) -> Grid:
  if name not in GRIDS:
    raise ValueError(f"unknown grid {name!r}; expected one of: {', '.join(GRIDS)}")
  return GRIDS[name]


def cell_config(grid: Grid, cell: Cell, max_epochs: Optional[int] = None,
                data_dir: Optional[str] = None,
                teachers_dir: Optional[str] = None) -> ml_collections.ConfigDict:
  """The config of one cell (what the grid's config file gives for it), seed set."""
  smoke = ',smoke' if grid.smoke else ''
  if grid.config == 'standard':
    config = cifar100_standard.get_config(
        f'method={cell.method},pair={cell.pair},dataset={cell.dataset}{smoke}')
  else:
    config = default.get_config(smoke.lstrip(','), method=cell.method, dataset=cell.dataset)
    config.teacher.model, config.model = cell.teacher, cell.student
  config.tag = grid.tag
  for key, value in grid.overrides:
    config[key] = value
  config.seed = cell.seed
  if max_epochs is not None and max_epochs < config.num_epochs:
    # The epoch count is part of a run's identity: capped runs get their own
    # directories (and teachers, which inherit the tag). The lr drops keep their
    # place in the shorter schedule (epochs 100, 150 of 200 -> 2, 4 of 5).
    scale = max_epochs / config.num_epochs
    config.lr_boundaries = tuple(sorted({max(1, round(b * scale)) for b in config.lr_boundaries}))
    config.num_epochs = max_epochs
    for section in config.distill.values():  # an init stage shrinks alike
      if section.get('init_epochs'):
        section.init_epochs = max(1, round(section.init_epochs * scale))
    config.tag = f'{config.tag}_e{max_epochs}' if config.tag else f'e{max_epochs}'
  config.data_dir = data_dir
  if teachers_dir and rundir.needs_teacher(cell.method):
    published = published_teacher(teachers_dir, cell.teacher)
    if published:
      config.teacher.checkpoint = published
  return config


def published_teacher(teachers_dir: str, model: str) -> Optional[str]:
  """RepDistiller's/mdistiller's `<model>_vanilla/ckpt_epoch_240.pth` under teachers_dir."""
  path = os.path.join(os.path.abspath(teachers_dir), f'{model}_vanilla', 'ckpt_epoch_240.pth')
  return path if os.path.isfile(path) else None


def _selected(values: Optional[Sequence], default: Sequence) -> Tuple:
  return tuple(default if values is None else values)


def plan(grid_name: str, workdir: str, methods: Optional[Sequence[str]] = None,
         datasets: Optional[Sequence[str]] = None, depths: Optional[Sequence[int]] = None,
         seeds: Optional[Sequence[int]] = None, max_epochs: Optional[int] = None,
         data_dir: Optional[str] = None, pairs: Optional[Sequence[str]] = None,
         teachers_dir: Optional[str] = None) -> List[PlannedRun]:
  """Every run of the grid (or of the selected subset): teachers first, then cells.

  `methods`, `datasets`, `pairs` and `seeds` replace the grid's lists (a subset, or
  values the grid lacks, e.g. more seeds); `depths` N selects resnet_32_N >> resnet_32_N.
  """
  grid = get_grid(grid_name)
  if teachers_dir and not os.path.isdir(teachers_dir):
    raise ValueError(f'--teachers_dir={teachers_dir!r} is not a directory')
  methods, datasets = _selected(methods, grid.methods), _selected(datasets, grid.datasets)
  if depths is not None:
    if pairs is not None:
      raise ValueError('give --pairs or --depths, not both')
    pairs = [resnet_32_pair(d) for d in depths]
  pairs, seeds = _selected(pairs, grid.pairs), _selected(seeds, grid.seeds)
  for method in methods:
    for name in distiller.split_names(method):
      methods_lib.get(name)  # refuses unknown names
  for pair in pairs:
    if pair.count('>>') != 1:
      raise ValueError(f"bad pair {pair!r}; expected '<teacher>>><student>'")
  if max_epochs is not None and max_epochs < 1:
    raise ValueError(f'max_epochs={max_epochs} is not accepted; expected an integer >= 1')
  workdir = os.path.abspath(workdir)

  def planned(role, cell, config=None):
    config = config or cell_config(grid, cell, max_epochs, data_dir, teachers_dir)
    train.validate_config(config)
    return PlannedRun(role, cell, config, os.path.join(workdir, rundir.run_name(config)))

  cells = [Cell(m, d, p, s) for s in seeds for d in datasets for p in pairs for m in methods]
  if not cells:
    raise ValueError('the selection is empty: no method, dataset, pair or seed')
  by_name = {}
  for cell in cells:
    run_ = planned('cell', cell)
    if run_.name in by_name:
      # The vanilla student of two pairs with one student model is one run.
      if rundir.run_identity(run_.config) != rundir.run_identity(by_name[run_.name].config):
        raise ValueError(f'two cells of the grid, {by_name[run_.name].cell} and {cell}, would '
                         f'share the run directory {run_.name} with different configs')
      continue
    by_name[run_.name] = run_
  runs = list(by_name.values())
  teacher_runs = {}
  for run in runs:
    if not rundir.needs_teacher(run.cell.method) or run.config.teacher.checkpoint:
      continue
    wanted = teachers.teacher_config(run.config)
    name = rundir.run_name(wanted)
    if name in by_name:
      # A cell of the grid is this teacher (the reference's baseline of seed 0): it
      # must be the very run a student would train as its teacher.
      if rundir.run_identity(wanted) != rundir.run_identity(by_name[name].config):
        raise ValueError(f'the teacher of {run.name} ({name}) differs from the grid\'s cell '
                         f'of that name; the grid and configs disagree')
      teacher_runs.setdefault(name, dataclasses.replace(by_name[name], role='teacher'))
    else:
      cell = Cell('base', run.cell.dataset, f'{wanted.model}>>{wanted.model}', wanted.seed)
      teacher_runs.setdefault(name, planned('teacher', cell, wanted))
  students = [run for run in runs if run.name not in teacher_runs]
  return list(teacher_runs.values()) + students


def train_images(config) -> int:
  """Training examples per epoch, from the split's name (no dataset needed)."""
  split = config.train_split
  size = TRAIN_SIZES.get(config.dataset)
  match = re.fullmatch(r'train\[(\d*):(\d*)(%?)\]', split)
  if size is None or (split != 'train' and not match):
    raise ValueError(f'cannot size split {split!r} of {config.dataset!r} without the data')
  if match:
    lo, hi, percent = match.groups()
    scale = size / 100 if percent else 1
    lo, hi = int(float(lo or 0) * scale), int(float(hi) * scale) if hi else size
    size = min(hi, size) - lo
  return size


TRAIN_SIZES = {'cifar10': 50000, 'cifar100': 50000}


def estimate_hours(runs: Sequence[PlannedRun], benchmark: dict) -> Tuple[float, List[str]]:
  """(hours of the runs not done, notes) from the benchmark's measured rates: each run's
  epochs (its init stage's included) x training images / its pair's end-to-end images/s
  (the train step's rate where the benchmark measured only that, plus a sixth for
  evaluation). A method the benchmark did not time is estimated by the pair's 'kd' row
  (noted)."""
  rows = benchmark['rows']
  rate = {}
  for row in rows:
    value = row.get('e2e_img_s') or row['step_img_s'] * 5 / 6
    rate[(row['method'], row.get('teacher') or row['student'], row['student'], row['batch'])] = value
  hours, notes = 0.0, []
  for run in runs:
    if run.status() == 'done':
      continue
    c = run.config
    key = (c.method, c.teacher.model if c.method != 'base' else c.model, c.model, c.batch_size)
    value = rate.get(key) or rate.get(('kd', c.teacher.model, c.model, c.batch_size)) or rate.get(
        ('base', c.model, c.model, c.batch_size))
    if value is None:
      raise ValueError(f'the benchmark has no row for {c.teacher.model}>>{c.model} at batch '
                       f'{c.batch_size}; run python -m kd_jax.benchmark --methods=kd '
                       f'--models={c.teacher.model}>>{c.model} --batch={c.batch_size} --json=...')
    if key not in rate:
      notes.append(f'{run.name}: timed as another method of its pair')
    # A partial run is counted in full (its epochs done are in its checkpoint); an init
    # stage's epochs as main ones (they cost at most as much). After an init stage at
    # weight 0 (AB, FSP) the main stage is CE alone: timed as the student's base run.
    init_epochs = sum(s.get('init_epochs', 0) for s in c.distill.values())
    main_value = value
    if any(distiller.off_in_main_stage(s) for s in c.distill.values()):
      main_value = rate.get(('base', c.model, c.model, c.batch_size), value)
    hours += (c.num_epochs / main_value + init_epochs / value) * train_images(c) / 3600
  return hours, notes


def format_plan(runs: Sequence[PlannedRun]) -> str:
  lines = [f'{run.status():8s}{run.role:9s}{run.run_dir}' for run in runs]
  counts = {s: sum(run.status() == s for run in runs) for s in ('done', 'partial', 'todo')}
  lines.append(f'{len(runs)} runs: ' + ', '.join(f'{n} {s}' for s, n in counts.items()))
  return '\n'.join(lines)


def seed_groups(runs: Sequence[PlannedRun]) -> List[List[PlannedRun]]:
  """The runs as groups that train together (config.num_seeds): the consecutive seeds
  of each cell (same role, method, dataset and pair), in the order of the plan."""
  by_cell = {}
  for planned_run in runs:
    cell = planned_run.cell
    by_cell.setdefault((planned_run.role, cell.method, cell.dataset, cell.pair),
                       []).append(planned_run)
  groups = []
  for members in by_cell.values():
    members = sorted(members, key=lambda r: r.cell.seed)
    groups.append(members[:1])
    for planned_run in members[1:]:
      if planned_run.cell.seed == groups[-1][-1].cell.seed + 1:
        groups[-1].append(planned_run)
      else:
        groups.append([planned_run])
  return groups


def run(runs: Sequence[PlannedRun], workdir: str, log: Callable[[str], None] = print,
        seeds_together: bool = False) -> List[str]:
  """Trains every run not done yet, in order; returns the names of those it trained.
  With `seeds_together`, the consecutive seeds of a cell train in one program. A cell
  whose method cannot distil its pair is logged and skipped (nothing is written for it)."""
  trained = []
  groups = seed_groups(runs) if seeds_together else [[r] for r in runs]
  for i, group in enumerate(groups, 1):
    names = ', '.join(r.name for r in group)
    todo = [r for r in group if r.status() != 'done']
    if not todo:
      log(f'[{i}/{len(groups)}] done: {names}')
      continue
    log(f'[{i}/{len(groups)}] '
        f'{"resuming" if any(r.status() == "partial" for r in todo) else "training"}: {names}')
    try:
      if len(group) == 1:
        train.train_and_evaluate(group[0].config, workdir)
      else:
        config = ml_collections.ConfigDict(group[0].config.to_dict())
        config.num_seeds = len(group)
        assert [rundir.run_name(c) for c in train.seed_configs(config)] == [r.name for r in group]
        train.train_runs(config, workdir)
    except ValueError as e:
      if not UNSUPPORTED.search(str(e)):
        raise
      log(f'[{i}/{len(groups)}] skipped: {e}')
      continue
    trained.extend(r.name for r in todo)
  return trained


def seeds_together_by_default() -> bool:
  """Where JAX's default backend is an accelerator, a cell's seeds train together (the
  vmapped students fill the device); on a CPU separate runs are faster."""
  import jax  # pylint: disable=g-import-not-at-top
  return jax.default_backend() != 'cpu'


# What train.py says, before writing anything, of a method that cannot use a pair.
UNSUPPORTED = re.compile(r"^method '[^']+' cannot (distil between|compare)")


def _ints(values):
  return None if values is None else [int(v) for v in values]


def main(argv):
  del argv
  from absl import flags, logging  # pylint: disable=g-import-not-at-top
  flags_ = flags.FLAGS
  logging.get_absl_handler().addFilter(lambda record: 'orbax' not in record.pathname)
  try:
    runs = plan(flags_.grid, flags_.workdir, flags_.methods, flags_.datasets,
                _ints(flags_.depths), _ints(flags_.seeds), flags_.max_epochs, flags_.data_dir,
                pairs=flags_.pairs, teachers_dir=flags_.teachers_dir)
    print(format_plan(runs), flush=True)
    if flags_.benchmark:
      with open(flags_.benchmark) as f:
        hours, notes = estimate_hours(runs, json.load(f))
      for note in notes:
        print(f'  note: {note}')
      print(f'estimated time of the runs not done: {hours:.1f} h on the benchmark\'s machine '
            f'({flags_.benchmark})', flush=True)
    if flags_.dry_run:
      return
    together = flags_.seeds_together
    if together is None:
      together = seeds_together_by_default()
      print(f'seeds together: {"on" if together else "off"} (the default on this backend; '
            '--seeds_together or --noseeds_together to choose)', flush=True)
    run(runs, flags_.workdir, log=lambda msg: (print(msg, flush=True), logging.info(msg)),
        seeds_together=together)
    print(format_plan(runs), flush=True)
    if flags_.report:
      from kd_jax import report  # pylint: disable=g-import-not-at-top
      seeds = flags_.seeds or get_grid(flags_.grid).seeds
      out = report.write_report(flags_.workdir, os.path.join(flags_.workdir, 'report'),
                                expected_seeds=len(seeds),
                                tag=runs[0].config.tag)  # only this grid's runs
      print(f'report: {out}')
  except (ValueError, OSError) as e:
    logging.error('%s', e)
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)


def _define_flags():
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_enum('grid', 'reference', list(GRIDS), 'Which grid to run.')
  flags.DEFINE_string('workdir', None, 'Root directory of the runs (one per cell).')
  flags.DEFINE_list('methods', None, 'Only these methods (default: the grid\'s).')
  flags.DEFINE_list('datasets', None, 'Only these datasets (default: the grid\'s).')
  flags.DEFINE_list('pairs', None, "Only these teacher>>student pairs (quote them), e.g. "
                    "'resnet32x4>>resnet8x4' (default: the grid's).")
  flags.DEFINE_list('depths', None, 'Only the resnet_32_N >> resnet_32_N pairs of these depths, '
                    'e.g. 20,110 (the reference grid).')
  flags.DEFINE_list('seeds', None, 'Only these seeds (default: the grid\'s).')
  flags.DEFINE_integer('max_epochs', None, 'Caps every run at this many epochs (a quick pass; '
                       'lr drops scaled to match; capped runs get their own run '
                       'directories, tag e<N>).')
  flags.DEFINE_boolean('seeds_together', None, 'Train the consecutive seeds of each cell in '
                       'one program (config.num_seeds). Default: on where JAX\'s backend is an '
                       'accelerator, off on a CPU (separate runs are faster there).')
  flags.DEFINE_boolean('dry_run', False, 'Print the plan (run dir and done/partial/todo) '
                       'and exit.')
  flags.DEFINE_string('data_dir', None, 'A local TFDS folder holding the datasets.')
  flags.DEFINE_string('teachers_dir', None, 'A folder of published teachers, '
                      '<model>_vanilla/ckpt_epoch_240.pth (RepDistiller\'s cifar_teachers); '
                      'teachers not found there are trained first.')
  flags.DEFINE_string('benchmark', None, 'JSON written by python -m kd_jax.benchmark --json: '
                      'estimate the hours of the runs not done from its measured rates.')
  flags.DEFINE_boolean('report', True, 'Write the report to <workdir>/report when done.')
  flags.mark_flag_as_required('workdir')


if __name__ == '__main__':
  from absl import app  # pylint: disable=g-import-not-at-top
  _define_flags()
  app.run(main)
