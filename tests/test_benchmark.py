"""The benchmark runs end to end and reports every column (its timings are not tested)."""
import json
import os

import pytest

from kd_jax import benchmark


def test_benchmark_writes_every_measurement(tmp_path, capsys):
  out = tmp_path / 'bench.json'
  benchmark.main(['--methods=base', '--models=resnet_32_8', '--batch=32', '--eval_batch=32',
                  '--steps=1', '--steps_per_dispatch=2', '--epoch_images=160', '--classes=10',
                  '--students=2', f'--json={out}'])
  report = json.loads(out.read_text())
  row, = report['rows']
  assert row['method'] == 'base' and row['student'] == 'resnet_32_8' and row['teacher'] is None
  assert row['batch'] == 32 and row['device_count'] >= 1 and row['jax']
  assert row['students'] == 2
  assert row['xla_flags'] == os.environ.get('XLA_FLAGS', '')  # the flags it ran under
  for key in ('step_img_s', 'compile_s', 'eval_img_s', 'input_img_s', 'e2e_img_s',
              'students_img_s'):
    assert row[key] > 0, key
  assert (row['e2e_train_images'], row['e2e_eval_images']) == (160, 32)
  assert report['tfds_input_img_s'] > 0
  assert '| base | None | resnet_32_8 | 32 | float32 |' in capsys.readouterr().out


def test_benchmark_refuses_unknown_names():
  with pytest.raises(SystemExit):
    benchmark.main(['--methods=hint'])
