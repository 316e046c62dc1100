"""The field's CIFAR-100 table (teacher >> student pairs) beside the published numbers.

Part of the report (kd_jax.report) when its runs hold teacher >> student pairs. For each
pair and method: the mean and standard deviation over seeds of the best-epoch and of
the last-epoch test accuracy (the two protocols: RepDistiller reports the last epoch,
mdistiller the best), the number of seeds, the gain over the vanilla student (the
'base' run of the student model, same protocol), and the published number with its
source and protocol (kd_jax/published/cifar100.csv). Writes standard.md, standard.csv
and gains.png (method x pair heat map of the best-epoch gain over the vanilla student).
No JAX or TensorFlow here.
"""
import csv
import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

PUBLISHED = os.path.join(os.path.dirname(__file__), 'published', 'cifar100.csv')
PROTOCOLS = ('best', 'last')


def load_published(path: str = PUBLISHED) -> Dict[Tuple[str, str], dict]:
  """{(pair, method): {'top1', 'source', 'protocol', 'note'}}; method 'teacher' and 'base'
  (the vanilla student) included."""
  with open(path, newline='') as f:
    return {(row['pair'], row['method']): {**row, 'top1': float(row['top1'])}
            for row in csv.DictReader(f)}


def _accuracies(cell, protocol: str) -> np.ndarray:
  key = 'best_accuracy' if protocol == 'best' else 'final_accuracy'
  return np.array([100 * run.result[key] for run in cell.runs])


def _stats(cell, protocol: str) -> Tuple[float, float]:
  acc = _accuracies(cell, protocol)
  return float(acc.mean()), (float(acc.std(ddof=1)) if len(acc) > 1 else float('nan'))


def pair_columns(table) -> List[Tuple[str, str, str]]:
  """The table's columns with a teacher other than the student."""
  return [c for c in table.columns if c[1] != c[2]]


def pair_name(column) -> str:
  dataset, model, teacher = column
  return f'{teacher}>>{model}'


def rows(table, published: Dict) -> List[dict]:
  """One dict per (pair, method) that ran, the vanilla student first in each pair."""
  out = []
  for column in pair_columns(table):
    dataset, model, _ = column
    pair = pair_name(column)
    vanilla = table.cells.get(('base', (dataset, model, model)))
    for method in ['base'] + [m for m in table.methods if m != 'base']:
      cell = vanilla if method == 'base' else table.cells.get((method, column))
      if cell is None:
        continue
      row = {'dataset': dataset, 'pair': pair, 'method': method, 'n': cell.n,
             'seeds': ' '.join(map(str, cell.seeds))}
      for protocol in PROTOCOLS:
        mean, std = _stats(cell, protocol)
        row[f'{protocol}_mean'], row[f'{protocol}_std'] = mean, std
        row[f'{protocol}_gain'] = (None if method == 'base' or vanilla is None
                                   else mean - _stats(vanilla, protocol)[0])
      ref = published.get((pair, method)) if dataset == 'cifar100' else None
      row['published'] = ref['top1'] if ref else None
      row['published_protocol'] = ref['protocol'] if ref else ''
      row['published_source'] = ref['source'] if ref else ''
      row['diff_to_published'] = (None if ref is None
                                  else row[f"{ref['protocol']}_mean"] - ref['top1'])
      out.append(row)
  return out


def _pm(mean: float, std: float) -> str:
  return f'{mean:.2f}' + ('' if np.isnan(std) else f' ± {std:.2f}')


def _signed(value: Optional[float]) -> str:
  return '' if value is None else f'{value:+.2f}'


def markdown(table_rows: Sequence[dict], runs) -> List[str]:
  lines = ['| pair | method | n | best epoch | gain | last epoch | gain | published | '
           'ours - published |', '|' + '---|' * 9]
  for r in table_rows:
    ref = (f"{r['published']:.2f} ({r['published_protocol']}, "
           f"{_short(r['published_source'])})" if r['published'] is not None else '—')
    lines.append(
        f"| {r['pair']} | {r['method']} | {r['n']} | {_pm(r['best_mean'], r['best_std'])} | "
        f"{_signed(r['best_gain'])} | {_pm(r['last_mean'], r['last_std'])} | "
        f"{_signed(r['last_gain'])} | {ref} | {_signed(r['diff_to_published'])} |")
  lines += ['', 'Accuracies: CIFAR test top-1 (%), mean ± sample std over seeds; gain: minus '
            "the vanilla student ('base', same protocol); ours - published compares the "
            "published number's protocol (last epoch: RepDistiller, train_student.py:334; "
            "best epoch: mdistiller). Published numbers: kd_jax/published/cifar100.csv.", '']
  lines += cost_markdown(runs)
  return lines


def _short(source: str) -> str:
  return source.split(' ')[0]


def cost_markdown(runs) -> List[str]:
  wall = sum(run.result.get('wall_time_s', 0.0) for run in runs)
  device = sum(run.result.get('wall_time_s', 0.0) * run.result.get('device_count', 1)
               for run in runs)
  kinds = sorted({str(run.result.get('device_kind', '?')) for run in runs})
  return [f'Cost: {len(runs)} runs, {wall / 3600:.2f} h of wall time, {device / 3600:.2f} '
          f"device-hours ({', '.join(kinds)}), summed from the runs' result.json."]


def write_csv(table_rows: Sequence[dict], path: str):
  fields = ['dataset', 'pair', 'method', 'n', 'seeds', 'best_mean', 'best_std', 'best_gain',
            'last_mean', 'last_std', 'last_gain', 'published', 'published_protocol',
            'published_source', 'diff_to_published']
  with open(path, 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(fields)
    for r in table_rows:
      writer.writerow(['' if r[k] is None or (isinstance(r[k], float) and np.isnan(r[k]))
                       else (f'{r[k]:.4f}' if isinstance(r[k], float) else r[k])
                       for k in fields])


def plot_gains(table_rows: Sequence[dict], path: str):
  """Method x pair heat map of the best-epoch gain over the vanilla student."""
  from kd_jax import report  # pylint: disable=g-import-not-at-top
  plt = report._pyplot()  # pylint: disable=protected-access
  pairs = list(dict.fromkeys(r['pair'] for r in table_rows))
  methods = list(dict.fromkeys(r['method'] for r in table_rows if r['method'] != 'base'))
  grid = np.full((len(methods), len(pairs)), np.nan)
  for r in table_rows:
    if r['method'] != 'base' and r['best_gain'] is not None:
      grid[methods.index(r['method']), pairs.index(r['pair'])] = r['best_gain']
  fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(pairs), 1.2 + 0.45 * len(methods)))
  limit = max(1e-6, float(np.nanmax(np.abs(grid)))) if np.isfinite(grid).any() else 1.0
  image = ax.imshow(grid, cmap='RdBu', vmin=-limit, vmax=limit, aspect='auto')
  for (i, j), value in np.ndenumerate(grid):
    if np.isfinite(value):
      ax.text(j, i, f'{value:+.1f}', ha='center', va='center', fontsize='x-small')
  ax.set_xticks(range(len(pairs)))
  ax.set_xticklabels([p.replace('>>', '\n>> ') for p in pairs], fontsize='x-small')
  ax.set_yticks(range(len(methods)))
  ax.set_yticklabels(methods)
  fig.colorbar(image, ax=ax, label='best-epoch gain over the vanilla student (points)')
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def write(table, runs, out: str) -> Optional[List[str]]:
  """Writes standard.md/.csv and gains.png when the table has pairs; returns the lines
  the main report links, or None."""
  if not pair_columns(table):
    return None
  table_rows = rows(table, load_published())
  names = {'cifar10': 'CIFAR-10', 'cifar100': 'CIFAR-100'}
  datasets = ', '.join(sorted({names.get(c[0], c[0]) for c in pair_columns(table)}))
  lines = [f'# The {datasets} table (teacher >> student)', ''] + markdown(table_rows, runs)
  lines += ['', '![gains](gains.png)']
  with open(os.path.join(out, 'standard.md'), 'w') as f:
    f.write('\n'.join(lines) + '\n')
  write_csv(table_rows, os.path.join(out, 'standard.csv'))
  plot_gains(table_rows, os.path.join(out, 'gains.png'))
  return ['Teacher >> student pairs, best and last epoch, beside the published numbers: '
          '[standard.md](standard.md), [standard.csv](standard.csv), '
          '![gains](gains.png)']
