"""Runs a grid of experiments (the reference's table by default), resumably.

  python -m kd_jax.sweep --grid=reference --workdir=runs/reference
  python -m kd_jax.sweep --grid=small --workdir=runs/small --data_dir=../shared/tfds
  python -m kd_jax.sweep --grid=reference --workdir=runs/ref --methods=st,at --depths=20 \
      --seeds=0 --max_epochs=5 --dry_run

A grid is methods x datasets x depths x seeds; a cell is one (method, dataset, depth,
seed) run of `configs/<method>_<dataset>.py:depth=N` with `seed` set, in its own run
directory under --workdir (named by `rundir.run_name`). The plan lists every teacher
first (the baseline run of the teacher's model with `teacher.seed`, shared by every
student that needs it; it is also the baseline row's seed-`teacher.seed` run), then
the other cells, seed by seed. A cell whose run directory holds result.json is done
and skipped; an interrupted one resumes from its last epoch. Rerunning the same
command finishes the grid. When the grid is done, the report (kd_jax.report) is
written to <workdir>/report.

Cells run one after another in this process (no subprocess per cell: each would pay
TensorFlow's and JAX's start-up, and the loop already resumes after a crash). With
--seeds_together the consecutive seeds of a cell train in one program (config.num_seeds,
jax.vmap over students), in the same run directories.
"""
import dataclasses
import os
import sys
from typing import Callable, List, Optional, Sequence, Tuple

import ml_collections

from configs import default
from kd_jax import methods as methods_lib, rundir, teachers, train
from kd_jax.methods import distiller


@dataclasses.dataclass(frozen=True)
class Grid:
  methods: Tuple[str, ...]
  datasets: Tuple[str, ...]
  depths: Tuple[int, ...]
  seeds: Tuple[int, ...]
  smoke: bool = False  # start from the configs' `:smoke` settings
  tag: str = ''  # config.tag of every run (the run directories' suffix)
  overrides: Tuple[Tuple[str, object], ...] = ()  # (config field, value)


GRIDS = {
    # The reference's results table: 6 methods, CIFAR-10/100, ResNet-20 >> 20 and
    # ResNet-110 >> 110, 3 runs each (200 epochs; hours per run on a GPU).
    'reference': Grid(methods=('base', 'logit', 'st', 'at', 'at+st', 'fsp'),
                      datasets=('cifar10', 'cifar100'), depths=(20, 110), seeds=(0, 1, 2)),
    # A few minutes on a CPU: ResNet-8 >> 8 on 512 CIFAR-10 images, 2 epochs.
    'small': Grid(methods=('base', 'logit', 'st', 'at'), datasets=('cifar10',), depths=(8,),
                  seeds=(0, 1), smoke=True, tag='small',
                  overrides=(('train_split', 'train[:512]'), ('eval_split', 'test[:256]'),
                             ('num_epochs', 2), ('batch_size', 64), ('eval_batch_size', 256))),
}


@dataclasses.dataclass(frozen=True)
class Cell:
  method: str
  dataset: str
  depth: int
  seed: int


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
                data_dir: Optional[str] = None) -> ml_collections.ConfigDict:
  """The config of one cell, `default.get_config('depth=N[,smoke]', method=, dataset=)`
  (what configs/<method>_<dataset>.py give), seed set."""
  config = default.get_config(f'depth={cell.depth}' + (',smoke' if grid.smoke else ''),
                              method=cell.method, dataset=cell.dataset)
  # `:smoke` picks resnet_32_8 whatever the depth: the cell's depth decides.
  config.model = config.teacher.model = f'resnet_32_{cell.depth}'
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
    config.tag = f'{config.tag}_e{max_epochs}' if config.tag else f'e{max_epochs}'
  config.data_dir = data_dir
  return config


def _depth(model: str) -> int:
  prefix = 'resnet_32_'
  if not model.startswith(prefix):
    raise ValueError(f'teacher model {model!r} is not a resnet_32_<depth>; the sweep cannot '
                     'plan its baseline run')
  return int(model[len(prefix):])


def _selected(values: Optional[Sequence], default: Sequence) -> Tuple:
  return tuple(default if values is None else values)


def plan(grid_name: str, workdir: str, methods: Optional[Sequence[str]] = None,
         datasets: Optional[Sequence[str]] = None, depths: Optional[Sequence[int]] = None,
         seeds: Optional[Sequence[int]] = None, max_epochs: Optional[int] = None,
         data_dir: Optional[str] = None) -> List[PlannedRun]:
  """Every run of the grid (or of the selected subset): teachers first, then cells.

  `methods`, `datasets`, `depths` and `seeds` replace the grid's lists (a subset, or
  values the grid lacks, e.g. more seeds).
  """
  grid = get_grid(grid_name)
  methods, datasets = _selected(methods, grid.methods), _selected(datasets, grid.datasets)
  depths, seeds = _selected(depths, grid.depths), _selected(seeds, grid.seeds)
  for method in methods:
    for name in distiller.split_names(method):
      methods_lib.get(name)  # refuses unknown names
  if max_epochs is not None and max_epochs < 1:
    raise ValueError(f'max_epochs={max_epochs} is not accepted; expected an integer >= 1')
  workdir = os.path.abspath(workdir)

  def planned(role, cell):
    config = cell_config(grid, cell, max_epochs, data_dir)
    train.validate_config(config)
    return PlannedRun(role, cell, config, os.path.join(workdir, rundir.run_name(config)))

  cells = [Cell(m, d, n, s) for s in seeds for d in datasets for n in depths for m in methods]
  if not cells:
    raise ValueError('the selection is empty: no method, dataset, depth or seed')
  runs = [planned('cell', cell) for cell in cells]
  teacher_runs = {}
  for run in runs:
    if not rundir.needs_teacher(run.cell.method):
      continue
    wanted = teachers.teacher_config(run.config)
    base = planned('teacher', Cell('base', run.cell.dataset, _depth(wanted.model),
                                   wanted.seed))
    # The baseline cell must be the very run a student would train as its teacher.
    if (rundir.run_name(wanted) != base.name
        or rundir.run_identity(wanted) != rundir.run_identity(base.config)):
      raise ValueError(f'the teacher of {run.name} ({rundir.run_name(wanted)}) is not the '
                       f'baseline cell {base.name}; the grid and configs disagree')
    teacher_runs.setdefault(base.name, base)
  students = [run for run in runs if run.name not in teacher_runs]
  return list(teacher_runs.values()) + students


def format_plan(runs: Sequence[PlannedRun]) -> str:
  lines = [f'{run.status():8s}{run.role:9s}{run.run_dir}' for run in runs]
  counts = {s: sum(run.status() == s for run in runs) for s in ('done', 'partial', 'todo')}
  lines.append(f'{len(runs)} runs: ' + ', '.join(f'{n} {s}' for s, n in counts.items()))
  return '\n'.join(lines)


def seed_groups(runs: Sequence[PlannedRun]) -> List[List[PlannedRun]]:
  """The runs as groups that train together (config.num_seeds): the consecutive seeds
  of each cell (same role, method, dataset and depth), in the order of the plan."""
  by_cell = {}
  for planned_run in runs:
    cell = planned_run.cell
    by_cell.setdefault((planned_run.role, cell.method, cell.dataset, cell.depth),
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
  With `seeds_together`, the consecutive seeds of a cell train in one program."""
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
    if len(group) == 1:
      train.train_and_evaluate(group[0].config, workdir)
    else:
      config = ml_collections.ConfigDict(group[0].config.to_dict())
      config.num_seeds = len(group)
      assert [rundir.run_name(c) for c in train.seed_configs(config)] == [r.name for r in group]
      train.train_runs(config, workdir)
    trained.extend(r.name for r in todo)
  return trained


def _ints(values):
  return None if values is None else [int(v) for v in values]


def main(argv):
  del argv
  from absl import flags, logging  # pylint: disable=g-import-not-at-top
  flags_ = flags.FLAGS
  logging.get_absl_handler().addFilter(lambda record: 'orbax' not in record.pathname)
  try:
    runs = plan(flags_.grid, flags_.workdir, flags_.methods, flags_.datasets,
                _ints(flags_.depths), _ints(flags_.seeds), flags_.max_epochs, flags_.data_dir)
    print(format_plan(runs), flush=True)
    if flags_.dry_run:
      return
    run(runs, flags_.workdir, log=lambda msg: (print(msg, flush=True), logging.info(msg)),
        seeds_together=flags_.seeds_together)
    print(format_plan(runs), flush=True)
    if flags_.report:
      from kd_jax import report  # pylint: disable=g-import-not-at-top
      seeds = flags_.seeds or get_grid(flags_.grid).seeds
      out = report.write_report(flags_.workdir, os.path.join(flags_.workdir, 'report'),
                                expected_seeds=len(seeds),
                                tag=runs[0].config.tag)  # only this grid's runs
      print(f'report: {out}')
  except ValueError as e:
    logging.error('%s', e)
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)


def _define_flags():
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_enum('grid', 'reference', list(GRIDS), 'Which grid to run.')
  flags.DEFINE_string('workdir', None, 'Root directory of the runs (one per cell).')
  flags.DEFINE_list('methods', None, 'Only these methods (default: the grid\'s).')
  flags.DEFINE_list('datasets', None, 'Only these datasets (default: the grid\'s).')
  flags.DEFINE_list('depths', None, 'Only these ResNet depths, e.g. 20,110.')
  flags.DEFINE_list('seeds', None, 'Only these seeds (default: the grid\'s).')
  flags.DEFINE_integer('max_epochs', None, 'Caps every run at this many epochs (a quick pass; '
                       'lr drops scaled to match; capped runs get their own run '
                       'directories, tag e<N>).')
  flags.DEFINE_boolean('seeds_together', False, 'Train the consecutive seeds of each cell in '
                       'one program (config.num_seeds; for accelerators: on a CPU separate runs '
                       'are faster).')
  flags.DEFINE_boolean('dry_run', False, 'Print the plan (run dir and done/partial/todo) '
                       'and exit.')
  flags.DEFINE_string('data_dir', None, 'A local TFDS folder holding the datasets.')
  flags.DEFINE_boolean('report', True, 'Write the report to <workdir>/report when done.')
  flags.mark_flag_as_required('workdir')


if __name__ == '__main__':
  from absl import app  # pylint: disable=g-import-not-at-top
  _define_flags()
  app.run(main)
