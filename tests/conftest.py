"""Shared test fixtures: the parity vectors and the real TFDS folder (when given)."""
import os

import numpy as np
import pytest

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
  variables = torch_import.torch_to_flax(prefixed(vectors, prefix), models.variable_shapes(model))
  return model, variables
