"""Shared test helpers: the parity vectors, the real TFDS folder (when given) and a
tiny prepared one."""
import atexit
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import pytest

# One persistent compilation cache for this test session, inherited by the subprocess
# runs (resume, kill -9, determinism...), which otherwise compile the same programs
# again and again: it takes about a third off the suite. Set before jax is imported.
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  _cache_dir = tempfile.mkdtemp(prefix='kd_jax_tests_xla_cache_')
  atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)
  os.environ['JAX_COMPILATION_CACHE_DIR'] = _cache_dir
  os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.3')

PARITY_DIR = os.environ.get('KD_PARITY_DIR',
                            os.path.join(os.path.dirname(__file__), 'data', 'parity'))
# CI points this at the prepared real CIFAR-10; without it the tests use mock data.
TFDS_DATA_DIR = os.environ.get('KD_TFDS_DATA_DIR')


def load_parity(name):
  path = os.path.join(PARITY_DIR, name)
  if not os.path.exists(path):
    pytest.fail(f'parity file {path} is missing (KD_PARITY_DIR={PARITY_DIR})')
  return dict(np.load(path))


def prefixed(arrays, prefix):
  """{'state/conv1.weight': a} -> {'conv1.weight': a} for prefix 'state'."""
  return {k[len(prefix) + 1:]: v for k, v in arrays.items() if k.startswith(prefix + '/')}


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def import_reference(vectors, prefix, model_name, num_classes=None):
  """(model, Flax variables) from the state_dict arrays stored under `prefix/`."""
  from kd_jax import models, torch_import  # pylint: disable=g-import-not-at-top
  model = models.create_model(model_name, num_classes or int(vectors['nclass']))
  variables = torch_import.torch_to_flax(prefixed(vectors, prefix), model)
  return model, variables


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(REPO, 'tests', 'train_worker.py')


def spawn_worker(spec):
  """tests/train_worker.py on `spec` in a process of its own (its own device count)."""
  return subprocess.Popen([sys.executable, WORKER, json.dumps(spec)], cwd=REPO,
                          env=dict(os.environ, PYTHONPATH=REPO), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def finish_worker(proc):
  output, _ = proc.communicate(timeout=600)
  assert proc.returncode == 0, output[-3000:]


def run_worker(spec):
  """Runs the worker on `spec` to the end; returns what it wrote to spec['out'] + '.json'."""
  finish_worker(spawn_worker(spec))
  with open(spec['out'] + '.json') as f:
    return json.load(f)


# tiny_config's test split; mock data ignores split slicing and gives 256 examples.
TINY_TEST_IMAGES = 200 if TFDS_DATA_DIR else 256


@contextlib.contextmanager
def wrapped_evaluate(wrapper):
  """Evaluation of both eval feeds goes through `wrapper(evaluate, variables)`: tests
  that keep the evaluated variables or stop a run during an evaluation."""
  from kd_jax import feeds  # pylint: disable=g-import-not-at-top
  originals = {cls: cls.evaluate for cls in (feeds.DeviceEvalFeed, feeds.HostEvalFeed)}
  try:
    for cls, real in originals.items():
      cls.evaluate = (lambda real: lambda self, variables: wrapper(
          lambda v: real(self, v), variables))(real)
    yield
  finally:
    for cls, real in originals.items():
      cls.evaluate = real


def tiny_config(method='base', dataset='cifar10', **overrides):
  """A smoke config on 256 train / 200 test images; overrides by dotted key."""
  from configs import default  # pylint: disable=g-import-not-at-top
  config = default.get_config('smoke', method=method, dataset=dataset)
  config.train_split, config.eval_split = 'train[:256]', 'test[:200]'
  config.batch_size, config.eval_batch_size = 64, 128
  config.data_dir = TFDS_DATA_DIR if dataset == 'cifar10' else None
  for key, value in overrides.items():
    *parents, leaf = key.split('.')
    node = config
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def data(dataset='cifar10'):
  """Real CIFAR-10 when given, mock data (256 examples per split) otherwise."""
  if dataset == 'cifar10' and TFDS_DATA_DIR:
    return contextlib.nullcontext()
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  return tfds.testing.mock_data(num_examples=256)


def tree_listing(root):
  """Every path under root with its size and mtime: 'nothing written' means equal."""
  out = {}
  for dirpath, dirnames, filenames in os.walk(root):
    for name in dirnames + filenames:
      path = os.path.join(dirpath, name)
      st = os.stat(path)
      out[os.path.relpath(path, root)] = (st.st_size, st.st_mtime_ns)
  return out


def step_kw(method, model, teacher_model=None, steps_per_epoch=10, train_size=100, **fields):
  """The train step's keyword arguments for `method` between kd_jax models, with
  fields[<method>] = {field: value} overriding the defaults."""
  from kd_jax.methods import distiller  # pylint: disable=g-import-not-at-top
  if method != 'base':
    teacher_model = teacher_model or model
  d, _ = distiller.for_models(method, fields, model, teacher_model, batch_size=2,
                              num_classes=model.num_classes, train_size=train_size,
                              steps_per_epoch=steps_per_epoch)
  return dict(model=model, distiller=d, steps_per_epoch=steps_per_epoch)


def random_variables(model, seed=0):
  """{'params', 'batch_stats'} of `model` without compiling its init (seconds on a CPU):
  weights normal with variance 1 / fan-in, biases 0, BatchNorm the identity. Enough for
  a frozen teacher whose features only need to be finite."""
  import jax  # pylint: disable=g-import-not-at-top
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  from kd_jax import models  # pylint: disable=g-import-not-at-top
  shapes = traverse_util.flatten_dict(models.variable_shapes(model))
  rng = np.random.default_rng(seed)

  def value(path, s):
    if path[-1] in ('scale', 'var'):
      return np.ones(s.shape, s.dtype)
    if path[-1] == 'kernel':
      return (rng.normal(size=s.shape) / np.sqrt(np.prod(s.shape[:-1]))).astype(s.dtype)
    return np.zeros(s.shape, s.dtype)

  return jax.tree.map(np.asarray, traverse_util.unflatten_dict(
      {path: value(path, s) for path, s in shapes.items()}))


def train_one_step(config, tmp_path=None):
  """(state, metrics) of one real train step of `config`'s method on random images,
  through the library's public API (models, methods, steps), teacher = student model."""
  del tmp_path
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from kd_jax import models, steps  # pylint: disable=g-import-not-at-top
  from kd_jax.methods import distiller  # pylint: disable=g-import-not-at-top
  model = models.create_model(config.model, 10)
  batch_size = 8
  d, ctx = distiller.for_models(config.method, config.distill.to_dict(), model, model,
                                batch_size=batch_size, num_classes=10, train_size=64,
                                steps_per_epoch=8)
  tx = steps.create_optimizer(lambda count: 0.1, 0.9, 5e-4)
  state = steps.create_train_state(model, models.init_variables(model, jax.random.key(0)), tx,
                                   0, distiller.init_variables(d, ctx, jax.random.key(1),
                                                               batch_size))
  teacher = steps.Teacher(model, models.init_variables(model, jax.random.key(2)), True)
  rng = np.random.default_rng(0)
  batch = {'image': jnp.asarray(rng.normal(size=(batch_size, 32, 32, 3)), jnp.float32),
           'label': jnp.asarray(rng.integers(0, 10, batch_size), jnp.int32),
           'index': jnp.arange(batch_size, dtype=jnp.int32)}
  step = jax.jit(lambda s, b: steps.train_step(s, b, teacher, model=model, distiller=d,
                                               steps_per_epoch=8))
  return step(state, batch)


def write_tiny_cifar10(data_dir, sizes):
  """A real prepared TFDS data_dir holding a CIFAR-10 of random images with
  sizes={'train': n, 'test': m}, so that TFDS itself reads (and slices) the splits."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  version_dir = data_dir / 'cifar10' / '3.0.2'
  version_dir.mkdir(parents=True)
  features = tfds.builder('cifar10').info.features
  rng = np.random.default_rng(0)
  for split, size in sizes.items():
    path = version_dir / f'cifar10-{split}.tfrecord-00000-of-00001'
    with tf.io.TFRecordWriter(str(path)) as writer:
      for i in range(size):
        writer.write(features.serialize_example({
            'id': f'{split}_{i}',
            'image': rng.integers(0, 256, (32, 32, 3), dtype=np.uint8),
            'label': int(rng.integers(10)),
        }))
  splits = [{'name': s, 'shardLengths': [str(n)]} for s, n in sizes.items()]
  info = {'name': 'cifar10', 'version': '3.0.2', 'splits': splits}
  (version_dir / 'dataset_info.json').write_text(json.dumps(info))
  return str(data_dir)
