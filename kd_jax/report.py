"""The results table and accuracy curves of every run under a workdir.

  python -m kd_jax.report --workdir=runs/reference [--out=runs/reference/report] \
      [--expected_seeds=3] [--tag=...]

Reads every `<workdir>/*/result.json` (with the run's config.json), groups the runs by
cell (method, dataset, student, teacher), and averages the best test accuracy over
seeds. Runs of one cell must differ by their seed only: other config differences, a
different number of test images, a repeated seed or a result.json that does not match
its config.json are refused with an error naming the runs. Writes to --out:

- table.md: the reference's table (mean over seeds, (+x) the difference to the
  baseline of the same student model, the best of each column in bold, `[n=k]` where
  fewer than --expected_seeds runs finished, an avg column), the standard deviations,
  the reference's own numbers and ours beside them;
- table.csv: one row per cell (mean, std, n, seeds, delta, reference); runs.csv: one
  row per run (accuracies, epochs, wall time, images/s, device, versions, config hash);
- curves_<dataset>_<model>.png: test accuracy per epoch, one line per method (mean over
  seeds, from result.json's history): the reference's graph;
- bars.png: the table as bars (mean, std as error bars), the reference's numbers as marks;
- with teacher >> student pairs (the CIFAR-100 standard grid): standard.md/.csv (best and
  last epoch, gains, the published numbers) and gains.png (kd_jax.report_standard);
- the cost: runs, wall time and device-hours summed from the runs' result.json.

Accuracies are in percent; std is the sample standard deviation (ddof=1) over seeds.
"""
import collections
import csv
import dataclasses
import glob
import json
import os
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from kd_jax import report_standard, rundir

METHOD_LABELS = {'base': 'baseline', 'logit': 'Logits', 'st': 'ST', 'at': 'AT',
                 'at+st': 'ST + AT', 'fsp': 'FSP'}
DATASET_LABELS = {'cifar10': 'CIFAR 10', 'cifar100': 'CIFAR 100'}

# The reference's table (hankyul2/KnowledgeDistillation @f019dfc, README): best test
# accuracy (%), mean of 3 runs, keyed by column (dataset, student, teacher).
_C = {'c10_20': ('cifar10', 'resnet_32_20', 'resnet_32_20'),
      'c10_110': ('cifar10', 'resnet_32_110', 'resnet_32_110'),
      'c100_20': ('cifar100', 'resnet_32_20', 'resnet_32_20'),
      'c100_110': ('cifar100', 'resnet_32_110', 'resnet_32_110')}
REFERENCE = {
    method: dict(zip(_C.values(), values)) for method, values in {
        'base': (92.0, 92.5, 67.6, 71.6),
        'logit': (92.5, 94.2, 69.2, 71.8),
        'st': (92.8, 93.9, 69.9, 74.1),
        'at': (91.9, 93.3, 68.4, 72.6),
        'at+st': (92.6, 93.7, 68.7, 73.7),
        'fsp': (92.0, 92.7, 68.0, 72.8),
    }.items()}
REFERENCE_RUNS = 3
REFERENCE_FEWER_RUNS = {('at+st', _C['c10_110']): 2, ('at+st', _C['c100_110']): 2}

Column = Tuple[str, str, str]  # (dataset, student model, teacher model)
CellKey = Tuple[str, str, str, Optional[str]]  # (method, dataset, model, teacher or None)


@dataclasses.dataclass
class Run:
  run_dir: str
  result: dict
  config: dict

  @property
  def name(self) -> str:
    return os.path.basename(self.run_dir)

  @property
  def key(self) -> CellKey:
    r = self.result
    return r['method'], r['dataset'], r['model'], r.get('teacher')


@dataclasses.dataclass
class Cell:
  key: CellKey
  runs: List[Run]  # sorted by seed

  @property
  def method(self) -> str:
    return self.key[0]

  @property
  def column(self) -> Column:
    method, dataset, model, teacher = self.key
    return dataset, model, teacher or model

  @property
  def accuracies(self) -> np.ndarray:
    return np.array([100 * run.result['best_accuracy'] for run in self.runs])

  @property
  def n(self) -> int:
    return len(self.runs)

  @property
  def seeds(self) -> List[int]:
    return [run.result['seed'] for run in self.runs]

  @property
  def mean(self) -> float:
    return float(self.accuracies.mean())

  @property
  def std(self) -> float:
    return float(self.accuracies.std(ddof=1)) if self.n > 1 else float('nan')


def load_runs(workdir: str, tag: Optional[str] = None) -> List[Run]:
  """Every finished run under `workdir` (with config.tag == tag when given)."""
  runs = []
  for path in sorted(glob.glob(os.path.join(workdir, '*', rundir.RESULT_FILE))):
    run_dir = os.path.dirname(path)
    config_path = os.path.join(run_dir, rundir.CONFIG_FILE)
    if not os.path.exists(config_path):
      raise ValueError(f'{run_dir} has {rundir.RESULT_FILE} but no {rundir.CONFIG_FILE}; '
                       'cannot check which runs may be averaged')
    with open(path) as f:
      result = json.load(f)
    with open(config_path) as f:
      config = json.load(f)
    if tag is not None and config.get('tag', '') != tag:
      continue
    if result.get('config_hash') != rundir.config_hash(config):
      raise ValueError(f'{path} does not belong to {config_path} (config hash '
                       f"{result.get('config_hash')} != {rundir.config_hash(config)})")
    runs.append(Run(run_dir, result, config))
  return runs


def _identity_without_seed(run: Run) -> dict:
  identity = rundir.run_identity(run.config)
  identity.pop('seed', None)
  return identity


def group_cells(runs: Sequence[Run]) -> Dict[CellKey, Cell]:
  """The runs by cell; refuses to put runs that are not comparable in one cell."""
  grouped = collections.defaultdict(list)
  for run in runs:
    grouped[run.key].append(run)
  cells = {}
  for key, members in grouped.items():
    members = sorted(members, key=lambda r: (r.result['seed'], r.name))
    first = members[0]
    reference_identity = _identity_without_seed(first)
    for other in members[1:]:
      identity = _identity_without_seed(other)
      differ = sorted(k for k in set(identity) | set(reference_identity)
                      if identity.get(k) != reference_identity.get(k))
      if differ:
        raise ValueError(f'refusing to average {first.name} and {other.name}: their configs '
                         f'differ in {", ".join(differ)}, not only in the seed')
      if other.result['num_test_images'] != first.result['num_test_images']:
        raise ValueError(f'refusing to average {first.name} and {other.name}: they were '
                         f"evaluated on {first.result['num_test_images']} and "
                         f"{other.result['num_test_images']} test images")
    seeds = [r.result['seed'] for r in members]
    repeated = sorted({s for s in seeds if seeds.count(s) > 1})
    if repeated:
      names = [r.name for r in members if r.result['seed'] in repeated]
      raise ValueError(f'refusing to average {", ".join(names)}: the same seed '
                       f'{repeated[0]} twice')
    cells[key] = Cell(key, members)
  return cells


def _order(method: str) -> Tuple:
  methods = list(METHOD_LABELS)
  return (methods.index(method), '') if method in methods else (len(methods), method)


def _depth(model: str) -> str:
  return model[len('resnet_32_'):] if model.startswith('resnet_32_') else model


def _column_order(column: Column) -> Tuple:
  dataset, model, teacher = column
  datasets = list(DATASET_LABELS)
  key = lambda m: (0, int(_depth(m)), '') if _depth(m).isdigit() else (1, 0, m)
  return ((datasets.index(dataset), '') if dataset in datasets else (len(datasets), dataset),
          key(model), key(teacher))


def column_label(column: Column) -> str:
  dataset, model, teacher = column
  return f'{DATASET_LABELS.get(dataset, dataset)} {_depth(teacher)} >> {_depth(model)}'


def method_label(method: str) -> str:
  return METHOD_LABELS.get(method, method)


@dataclasses.dataclass
class Table:
  """Means per (method, column), with what the report prints around them."""
  methods: List[str]
  columns: List[Column]
  cells: Dict[Tuple[str, Column], Cell]

  @classmethod
  def from_cells(cls, cells: Dict[CellKey, Cell]) -> 'Table':
    by_position = {(cell.method, cell.column): cell for cell in cells.values()}
    methods = sorted({m for m, _ in by_position}, key=_order)
    columns = sorted({c for _, c in by_position}, key=_column_order)
    return cls(methods, columns, by_position)

  def mean(self, method: str, column: Column) -> Optional[float]:
    cell = self.cells.get((method, column))
    return None if cell is None else cell.mean

  def baseline(self, column: Column) -> Optional[float]:
    dataset, model, _ = column
    return self.mean('base', (dataset, model, model))

  def delta(self, method: str, column: Column) -> Optional[float]:
    mean, base = self.mean(method, column), self.baseline(column)
    return None if method == 'base' or mean is None or base is None else mean - base

  def avg(self, method: str) -> Optional[float]:
    means = [self.mean(method, c) for c in self.columns]
    return None if any(m is None for m in means) else float(np.mean(means))

  def avg_delta(self, method: str) -> Optional[float]:
    if method == 'base':
      return None
    baselines = [self.baseline(c) for c in self.columns]
    avg = self.avg(method)
    if avg is None or any(b is None for b in baselines):
      return None
    return avg - float(np.mean(baselines))


def _fmt(value: float) -> str:
  return f'{value:.1f}'


def _fmt_delta(delta: Optional[float]) -> str:
  if delta is None:
    return ''
  rounded = round(delta, 1)
  return f'({"+" if rounded >= 0 else "-"}{abs(rounded):.1f})'


def _markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> List[str]:
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  return lines + ['| ' + ' | '.join(row) + ' |' for row in rows]


def _bold_best(values: Dict[str, Optional[float]]) -> set:
  present = [v for v in values.values() if v is not None]
  return {k for k, v in values.items() if present and v == max(present)}


def results_markdown(table: Table, expected_seeds: int) -> List[str]:
  """The reference's format: mean(+delta), best of each column in bold, an avg column."""
  rows = {method: [method_label(method)] for method in table.methods}
  fewer = False
  for column in table.columns:
    best = _bold_best({m: table.mean(m, column) for m in table.methods})
    for method in table.methods:
      cell = table.cells.get((method, column))
      if cell is None:
        rows[method].append('—')
        continue
      text = _fmt(cell.mean) + _fmt_delta(table.delta(method, column))
      text = f'**{text}**' if method in best else text
      if cell.n < expected_seeds:
        text += f' [n={cell.n}]'
        fewer = True
      rows[method].append(text)
  best = _bold_best({m: table.avg(m) for m in table.methods})
  for method in table.methods:
    avg = table.avg(method)
    text = '—' if avg is None else _fmt(avg) + _fmt_delta(table.avg_delta(method))
    rows[method].append(f'**{text}**' if method in best else text)
  lines = _markdown(['Method'] + [column_label(c) for c in table.columns] + ['avg'],
                    list(rows.values()))
  lines += ['', f'Best test accuracy (%), mean over seeds (expected {expected_seeds}); (+x): '
            'difference to the baseline of the same student model; bold: best of the column; '
            'avg: mean over the columns.']
  if fewer:
    lines.append(f'[n=k]: mean of k runs, fewer than the expected {expected_seeds}.')
  return lines


def std_markdown(table: Table) -> List[str]:
  rows = []
  for method in table.methods:
    row = [method_label(method)]
    for column in table.columns:
      cell = table.cells.get((method, column))
      row.append('—' if cell is None else
                 f"{'—' if cell.n < 2 else f'{cell.std:.2f}'} (n={cell.n}, seeds "
                 f"{','.join(map(str, cell.seeds))})")
    rows.append(row)
  return _markdown(['Method'] + [column_label(c) for c in table.columns], rows)


def reference_markdown() -> List[str]:
  columns = list(_C.values())
  rows = []
  for method, values in REFERENCE.items():
    row = [method_label(method)]
    for column in columns:
      mark = '*' if (method, column) in REFERENCE_FEWER_RUNS else ''
      row.append(f'{mark}{values[column]:.1f}')
    rows.append(row)
  return _markdown(['Method'] + [column_label(c) for c in columns], rows) + [
      '', f'hankyul2/KnowledgeDistillation (README @f019dfc): mean of {REFERENCE_RUNS} runs; '
      '\\* 2 runs.']


def comparison_markdown(table: Table) -> List[str]:
  columns = [c for c in table.columns if any(c in REFERENCE.get(m, {}) for m in table.methods)]
  if not columns:
    return ['The reference has none of these columns (it ran ResNet-20 >> 20 and '
            'ResNet-110 >> 110 on CIFAR-10 and CIFAR-100).']
  rows = []
  for method in table.methods:
    row = [method_label(method)]
    for column in columns:
      ours, ref = table.mean(method, column), REFERENCE.get(method, {}).get(column)
      if ours is None or ref is None:
        row.append('—' if ours is None else f'{_fmt(ours)} / —')
      else:
        row.append(f'{_fmt(ours)} / {_fmt(ref)} ({_fmt_delta(ours - ref)[1:-1]})')
    rows.append(row)
  return _markdown(['Method'] + [column_label(c) for c in columns], rows) + [
      '', 'ours / reference (ours - reference), best test accuracy (%).']


def write_csv(table: Table, path: str, expected_seeds: int):
  with open(path, 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(['method', 'dataset', 'model', 'teacher', 'column', 'n', 'expected_n',
                     'seeds', 'mean', 'std', 'delta_to_baseline', 'reference',
                     'reference_runs', 'diff_to_reference', 'num_test_images', 'epochs'])
    for column in table.columns:
      for method in table.methods:
        cell = table.cells.get((method, column))
        if cell is None:
          continue
        ref = REFERENCE.get(method, {}).get(column)
        delta = table.delta(method, column)
        first = cell.runs[0].result
        writer.writerow([
            method, column[0], column[1], cell.key[3] or '', column_label(column), cell.n,
            expected_seeds, ' '.join(map(str, cell.seeds)), f'{cell.mean:.4f}',
            '' if cell.n < 2 else f'{cell.std:.4f}', '' if delta is None else f'{delta:.4f}',
            '' if ref is None else ref,
            '' if ref is None else REFERENCE_FEWER_RUNS.get((method, column), REFERENCE_RUNS),
            '' if ref is None else f'{cell.mean - ref:.4f}', first['num_test_images'],
            first['epochs']])


def write_runs_csv(runs: Sequence[Run], path: str):
  fields = ['name', 'method', 'dataset', 'model', 'teacher', 'seed', 'best_accuracy',
            'final_accuracy', 'best_epoch', 'num_test_images', 'epochs', 'steps', 'wall_time_s',
            'train_images_per_s', 'device_kind', 'device_count', 'jax_version',
            'flax_version', 'config_hash']
  with open(path, 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(fields)
    for run in sorted(runs, key=lambda r: r.name):
      writer.writerow([run.result.get(k, '') if run.result.get(k) is not None else ''
                       for k in fields])


def _pyplot():
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def curves_filename(column: Column) -> str:
  dataset, model, teacher = column
  return f'curves_{dataset}_{model}' + ('' if teacher == model else f'_from_{teacher}') + '.png'


def plot_curves(table: Table, column: Column, path: str):
  """Test accuracy per epoch, one line per method (mean over seeds): the reference's graph."""
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(8, 5))
  for method in table.methods:
    cell = table.cells.get((method, column))
    if cell is None:
      continue
    histories = [run.result['history'] for run in cell.runs]
    epochs = min(len(h) for h in histories)
    acc = np.mean([[100 * e['test_accuracy'] for e in h[:epochs]] for h in histories], axis=0)
    ax.plot(np.arange(1, epochs + 1), acc, marker='o' if epochs <= 20 else None,
            markersize=3, label=f'{method_label(method)} (n={cell.n})')
  ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
  ax.set_xlabel('epoch')
  ax.set_ylabel('test accuracy (%)')
  ax.set_title(f'{column_label(column)}: test accuracy (mean over seeds)')
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def plot_bars(table: Table, path: str):
  """One panel per column (its own scale): a bar per method (mean, std as error bar),
  the reference's number as a black mark."""
  plt = _pyplot()
  colors = plt.rcParams['axes.prop_cycle'].by_key()['color']
  fig, axes = plt.subplots(1, len(table.columns), squeeze=False,
                           figsize=(max(5, 1 + 0.6 * len(table.methods)) * len(table.columns), 4.5))
  for ax, column in zip(axes[0], table.columns):
    values, ref_label = [], 'reference'
    for i, method in enumerate(table.methods):
      cell = table.cells.get((method, column))
      if cell is None:
        continue
      std = 0.0 if cell.n < 2 else cell.std
      ax.bar(i, cell.mean, 0.7, yerr=std, capsize=3, color=colors[i % len(colors)])
      ax.annotate(f'{cell.mean:.1f}', (i, cell.mean + std), ha='center', va='bottom',
                  fontsize='small', xytext=(0, 2), textcoords='offset points')
      values += [cell.mean - std, cell.mean + std]
      ref = REFERENCE.get(method, {}).get(column)
      if ref is not None:
        ax.plot([i - 0.4, i + 0.4], [ref, ref], color='black', linewidth=2, label=ref_label)
        ref_label = None
        values.append(ref)
    ax.set_xticks(range(len(table.methods)))
    ax.set_xticklabels([method_label(m) for m in table.methods], rotation=30, ha='right')
    spread = max(values) - min(values)
    ax.set_ylim(max(0.0, min(values) - max(1.0, spread)), max(values) + max(0.5, spread / 3))
    ax.set_title(column_label(column))
    ax.grid(axis='y', alpha=0.3)
    if ref_label is None:
      ax.legend(fontsize='small', loc='lower right')
  axes[0][0].set_ylabel('best test accuracy (%), mean over seeds')
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def write_report(workdir: str, out: Optional[str] = None, expected_seeds: int = 3,
                 tag: Optional[str] = None) -> str:
  """Writes the table, CSVs and plots of the runs under `workdir` to `out`; returns `out`."""
  out = out or os.path.join(workdir, 'report')
  runs = load_runs(workdir, tag)
  if not runs:
    raise ValueError(f'no finished run (*/{rundir.RESULT_FILE}) under {workdir!r}'
                     + ('' if tag is None else f' with tag {tag!r}'))
  table = Table.from_cells(group_cells(runs))
  os.makedirs(out, exist_ok=True)
  lines = ['# Results', '', f'{len(runs)} runs under `{os.path.abspath(workdir)}`.', '']
  lines += results_markdown(table, expected_seeds)
  lines += ['', '## Standard deviation over seeds (percentage points)', '']
  lines += std_markdown(table)
  lines += ['', '## Against the reference', '']
  lines += comparison_markdown(table)
  lines += ['', "### The reference's table", '']
  lines += reference_markdown()
  lines += ['', '## Plots', '']
  lines += [f'![{column_label(c)}]({curves_filename(c)})' for c in table.columns]
  lines += ['![bars](bars.png)']
  standard = report_standard.write(table, runs, out)
  if standard:
    lines += ['', '## Teacher >> student pairs', ''] + standard
  lines += ['', report_standard.cost_markdown(runs)[0]]
  with open(os.path.join(out, 'table.md'), 'w') as f:
    f.write('\n'.join(lines) + '\n')
  write_csv(table, os.path.join(out, 'table.csv'), expected_seeds)
  write_runs_csv(runs, os.path.join(out, 'runs.csv'))
  for column in table.columns:
    plot_curves(table, column, os.path.join(out, curves_filename(column)))
  plot_bars(table, os.path.join(out, 'bars.png'))
  return out


def main(argv):
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags_ = flags.FLAGS
  try:
    out = write_report(flags_.workdir, flags_.out, flags_.expected_seeds, flags_.tag)
  except ValueError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  print(f'report: {out}')


if __name__ == '__main__':
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string('workdir', None, 'Root directory of the runs.')
  flags.DEFINE_string('out', None, 'Where to write the report (default: <workdir>/report).')
  flags.DEFINE_integer('expected_seeds', 3, 'Runs expected per cell; cells with fewer are '
                       'marked [n=k].')
  flags.DEFINE_string('tag', None, 'Only runs with this config.tag (default: all).')
  flags.mark_flag_as_required('workdir')
  app.run(main)
