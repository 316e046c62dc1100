"""The XLA:CPU flag kd_jax sets on import (kd_jax/cpu_flags.py), checked in fresh
processes: XLA reads XLA_FLAGS once, when its first backend starts."""
import json
import os
import subprocess
import sys

from kd_jax import cpu_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Prints XLA_FLAGS after importing kd_jax, then which of a convolution and a
# BatchNorm-style reduction XLA:CPU compiled into YNNPACK fusions.
PROBE = r"""
import json, os, re
import kd_jax
import jax, jax.numpy as jnp
def f(x, w):
  y = jax.lax.conv_general_dilated(x, w, (1, 1), 'SAME',
                                   dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  return y, jnp.sum(x, (0, 1, 2))
x = jax.ShapeDtypeStruct((8, 7, 7, 64), jnp.float32)
w = jax.ShapeDtypeStruct((3, 3, 64, 64), jnp.float32)
hlo = jax.jit(f).lower(x, w).compile().as_text()
called = re.findall(r'calls=(%[\w.-]+)[^\n]*__ynn_fusion', hlo)
bodies = {m[1]: m[2] for m in re.finditer(r'\n(%[\w.-]+) [^\n]*\{\n(.*?)\n\}', hlo, re.S)}
ops = sorted({op for name in called for op in ('convolution', 'reduce')
              if f' {op}(' in bodies[name]})
print(json.dumps({'XLA_FLAGS': os.environ.get('XLA_FLAGS'), 'ynn_ops': ops}))
"""


def _probe(xla_flags):
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  if xla_flags is not None:
    env['XLA_FLAGS'] = xla_flags
  out = subprocess.run([sys.executable, '-c', PROBE], cwd=ROOT, env=env, check=True,
                       capture_output=True, text=True).stdout
  return json.loads(out.strip().splitlines()[-1])


def test_convolutions_leave_ynnpack_and_reductions_stay():
  got = _probe(None)
  if cpu_flags._jaxlib_version() not in cpu_flags.KNOWN_JAXLIB:
    assert got['XLA_FLAGS'] is None  # XLA would stop at a flag it does not know
    return
  assert got['XLA_FLAGS'] == cpu_flags.FLAG
  assert got['ynn_ops'] == ['reduce']
  # Another user flag is kept beside it.
  assert _probe('--xla_cpu_enable_fast_math=false')['XLA_FLAGS'] == (
      f'--xla_cpu_enable_fast_math=false {cpu_flags.FLAG}')


def test_a_users_choice_wins(monkeypatch):
  mine = f'--{cpu_flags.OPTION}=+individual_convolution'
  monkeypatch.setenv('XLA_FLAGS', mine)
  monkeypatch.setattr(cpu_flags, '_jaxlib_version', lambda: cpu_flags.KNOWN_JAXLIB[0])
  assert not cpu_flags.apply()
  assert os.environ['XLA_FLAGS'] == mine


def test_unknown_jaxlib_gets_no_flag(monkeypatch):
  monkeypatch.delenv('XLA_FLAGS', raising=False)
  monkeypatch.setattr(cpu_flags, '_jaxlib_version', lambda: (0, 7))
  assert not cpu_flags.apply()
  assert 'XLA_FLAGS' not in os.environ
