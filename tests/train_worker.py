"""Runs tiny training runs in a fresh process (tests/test_parallel.py, test_reliability.py).

  python tests/train_worker.py SPEC_JSON
SPEC: {"devices": N, "workdir": ..., "runs": [{"method": ..., overrides...}],
       "out": npz path, "process_id": i, "num_processes": n, "port": p}
XLA_FLAGS must be set before jax is imported, hence a separate process. Saves the
final student variables of each run (as evaluated after the last epoch) to `out`.
With "x64_steps": [methods], instead compares, in float64, a few data-parallel train
steps and an eval step with the same steps jitted on one device, and saves the
largest relative differences; with "x64_init_steps": [methods], the same for the
init stage's step.
"""
import json
import os
import sys

spec = json.loads(sys.argv[1])
os.environ['XLA_FLAGS'] = f"--xla_force_host_platform_device_count={spec['devices']}"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import contextlib  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax
import numpy as np
import tensorflow_datasets as tfds
from flax import traverse_util

from kd_jax import models, parallel, steps, train
from kd_jax.methods import distiller
from tests.conftest import TFDS_DATA_DIR, random_variables, tiny_config, wrapped_evaluate


def compare_x64_steps(methods, num_steps=4):
  """Largest relative difference between pmap over all devices and one device."""
  jax.config.update('jax_enable_x64', True)
  import functools  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  as64 = lambda tree: jax.tree.map(
      lambda a: jnp.asarray(a, jnp.float64) if jnp.issubdtype(a.dtype, jnp.floating) else a,
      tree)
  single, sharded = (models.create_model('resnet_32_8', 10, axis_name=a) for a in (None, parallel.AXIS))
  tx = steps.create_optimizer(lambda count: 0.1, 0.9, 1e-4)
  student = as64(models.init_variables(single, jax.random.key(0)))
  teacher_vars = as64(models.init_variables(single, jax.random.key(1)))
  diffs = {}
  for method in methods:
    fields = {'crd': {'crd': {'num_negatives': 64}}}.get(method, {})  # CRD: small K
    d, ctx = distiller.for_models(method, fields, single, single, batch_size=16,
                                  num_classes=10, train_size=64, steps_per_epoch=10)
    kw = dict(distiller=d, steps_per_epoch=10)
    step1 = jax.jit(functools.partial(steps.train_step, model=single, **kw))
    stepn = parallel.data_parallel(functools.partial(steps.train_step, model=sharded, **kw), 1)
    s1 = sn = steps.create_train_state(single, student, tx, 0, as64(
        distiller.init_variables(d, ctx, jax.random.key(3), 16)))
    t1, tn = steps.Teacher(single, teacher_vars), steps.Teacher(sharded, teacher_vars)
    worst = 0.0
    for i in range(num_steps):
      batch = {'image': jax.random.normal(jax.random.key(10 + i), (16, 32, 32, 3), jnp.float64),
               'label': jax.random.randint(jax.random.key(20 + i), (16,), 0, 10),
               'index': jnp.arange(16) + 16 * i}  # dataset positions (CRD's memory rows)
      (s1, m1), (sn, mn) = step1(s1, batch, t1), stepn(sn, batch, tn)
      rel = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(a)) + 1e-30)),
                         (s1.params, s1.batch_stats, s1.method_state, m1),
                         (sn.params, sn.batch_stats, sn.method_state, mn))
      worst = max(worst, *jax.tree.leaves(rel))
    diffs[method] = worst
  batch = {'image': jax.random.normal(jax.random.key(3), (16, 32, 32, 3), jnp.float64),
           'label': jnp.arange(16) % 10, 'mask': jnp.arange(16) < 11}
  variables = s1.student_variables()
  e1 = jax.jit(functools.partial(steps.eval_step, model=single))(variables, batch)
  en = parallel.data_parallel(functools.partial(steps.eval_step, model=sharded))(variables, batch)
  diffs['eval'] = max(float(abs(e1[k] - en[k]) / max(abs(e1[k]), 1e-30)) for k in e1)
  diffs['eval_count'] = float(en['count'])
  return diffs


def compare_x64_init_steps(methods, num_steps=2):
  """compare_x64_steps for the init stage's step (init_epochs > 0) of student resnet8 and
  teacher resnet_32_8 (AB has connectors, with BatchNorm, between them): ||a - b|| / ||a||
  over each part of the carry and the metrics (an update of a bias that a BatchNorm
  cancels is rounding alone, so per-array bounds do not fit)."""
  jax.config.update('jax_enable_x64', True)
  import functools  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  as64 = lambda tree: jax.tree.map(
      lambda a: jnp.asarray(a, jnp.float64) if jnp.issubdtype(a.dtype, jnp.floating) else a,
      tree)

  def rel(a, b):
    pairs = [(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
             if jnp.issubdtype(x.dtype, jnp.floating)]
    diff = sum(float(jnp.sum((x - y)**2)) for x, y in pairs)
    return (diff / max(sum(float(jnp.sum(x**2)) for x, _ in pairs), 1e-300))**0.5

  single, sharded = (models.create_model('resnet8', 10, axis_name=a) for a in (None, parallel.AXIS))
  teacher_model = models.create_model('resnet_32_8', 10)
  teacher = steps.Teacher(teacher_model, as64(random_variables(teacher_model, 1)),
                          batch_stats_mode=False)
  tx = steps.create_optimizer(0.05, 0.9, 5e-4)
  head = models.head_modules(single)
  diffs = {}
  for method in methods:
    d, ctx = distiller.for_models(method, {method: {'init_epochs': 1}}, single, teacher_model,
                                  batch_size=16, num_classes=10, train_size=64, steps_per_epoch=10)
    kw = dict(distiller=d, head=head, tx=tx)
    step1 = jax.jit(functools.partial(steps.init_stage_step, model=single, **kw))
    stepn = parallel.data_parallel(functools.partial(steps.init_stage_step, model=sharded, **kw), 1)
    state = steps.create_train_state(
        single, as64(random_variables(single, 0)), tx, 0,
        as64(distiller.init_variables(d, ctx, jax.random.key(3), 16)))
    c1 = cn = steps.create_init_stage_state(state, d.init_stage, head, tx)
    for i in range(num_steps):
      batch = {'image': jax.random.normal(jax.random.key(10 + i), (16, 32, 32, 3), jnp.float64),
               'label': jax.random.randint(jax.random.key(20 + i), (16,), 0, 10)}
      (c1, m1), (cn, mn) = step1(c1, batch, teacher), stepn(cn, batch, teacher)
      parts = {'params': (c1.train.params, cn.train.params),
               'batch_stats': (c1.train.batch_stats, cn.train.batch_stats),
               'method_state': (c1.train.method_state, cn.train.method_state),
               'opt_state': (c1.opt_state, cn.opt_state), 'metrics': (m1, mn)}
      for name, (a, b) in parts.items():
        if jax.tree.leaves(a):
          key = f'{method}/{name}'
          diffs[key] = max(diffs.get(key, 0.0), rel(a, b))
  return diffs


if 'x64_init_steps' in spec:
  with open(spec['out'] + '.json', 'w') as f:
    json.dump({'diffs': compare_x64_init_steps(spec['x64_init_steps']),
               'device_count': jax.device_count()}, f)
  sys.exit(0)

if 'x64_steps' in spec:
  with open(spec['out'] + '.json', 'w') as f:
    json.dump({'diffs': compare_x64_steps(spec['x64_steps']),
               'device_count': jax.device_count()}, f)
  sys.exit(0)

if spec.get('num_processes', 1) > 1:
  parallel.initialize_distributed(f"localhost:{spec['port']}", spec['num_processes'],
                                  spec['process_id'])

last_variables = {}


def evaluate_and_keep(evaluate, variables):
  last_variables['v'] = variables
  return evaluate(variables)


data = (contextlib.nullcontext() if TFDS_DATA_DIR
        else tfds.testing.mock_data(num_examples=256))
saved, results = {}, []
with data, wrapped_evaluate(evaluate_and_keep):
  for i, run in enumerate(spec['runs']):
    config = tiny_config(**run)
    results.append(train.train_and_evaluate(config, spec['workdir']))
    flat = traverse_util.flatten_dict(jax.device_get(last_variables['v']), sep='/')
    saved.update({f'{i}/{k}': np.asarray(v) for k, v in flat.items()})
np.savez(spec['out'], **saved)
with open(spec['out'] + '.json', 'w') as f:
  json.dump({'results': results, 'device_count': jax.device_count(),
             'local_device_count': jax.local_device_count(),
             'process_index': jax.process_index()}, f)
