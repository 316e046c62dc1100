"""Shared test helpers: the parity vectors, the real TFDS folder (when given) and a
tiny prepared one."""
import atexit
import json
import os
import shutil
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
