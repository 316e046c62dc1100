"""Every model of the zoo against mdistiller's own PyTorch definitions (tests/data/zoo).

Each vector file holds an input batch, the outputs and features of mdistiller's model in
eval and train mode, and the BatchNorm statistics after the train-mode forward, for
weights made from a seed by tests/golden.py. The test makes the same weights, imports
them through kd_jax.torch_import (so the PyTorch names are tested too), and compares.
"""
import functools
import glob
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax import models, torch_import
from tests import golden
from tests.conftest import rel_err

ZOO_DIR = os.environ.get('KD_ZOO_DIR', os.path.join(os.path.dirname(__file__), 'data', 'zoo'))
NAMES = sorted(os.path.basename(p)[:-len('.npz')] for p in glob.glob(f'{ZOO_DIR}/*.npz'))
F32_RTOL = 1e-4  # the bound; the README of tests/data/zoo says why it is enough
F64_RTOL = 1e-6
# float64 costs a second compilation: one model per family.
# float64 and bfloat16 cost another compilation each: a few families (the suite's budget).
FLOAT64_NAMES = ('resnet8', 'wrn_16_1', 'vgg8', 'ResNet18')
BFLOAT16_NAMES = ('resnet8', 'wrn_16_1')


@functools.lru_cache(maxsize=None)
def _vectors(name):
  with np.load(os.path.join(ZOO_DIR, f'{name}.npz')) as f:
    z = {k: f[k] for k in f.files}
  spec = json.loads(str(z['state_spec']))
  state = golden.state_dict_values(int(z['seed']), spec)
  return z, state


def _outputs_of(z, mode):
  return {k[len(mode) + 1:]: v for k, v in z.items() if k.startswith(f'{mode}/')}


def _check_forward(name, dtype, rtol):
  z, state = _vectors(name)
  model = models.create_model(name, int(z['num_classes']))
  variables = torch_import.torch_to_flax(state, model)
  variables = jax.tree.map(lambda a: jnp.asarray(a, dtype), variables)
  x = jnp.asarray(z['x'], dtype)
  for mode in ('eval', 'train'):
    (logits, features), updates = model.apply(variables, x, train=mode == 'train',
                                              mutable=['batch_stats'])
    got = {**features, 'logits': logits}
    want = _outputs_of(z, mode)
    assert set(want) <= set(got), sorted(set(want) - set(got))
    for key, value in want.items():
      assert got[key].shape == value.shape, (name, mode, key)
      err = rel_err(got[key], value)
      assert err < rtol, (name, mode, key, err)
    if mode == 'train':
      after = torch_import.flax_to_torch({'params': variables['params'], **updates}, model)
      stats = {k[len('after_train/'):]: v for k, v in z.items() if k.startswith('after_train/')}
      assert stats
      for key, value in stats.items():
        if not key.endswith('num_batches_tracked'):
          assert rel_err(after[key], value) < rtol, (name, key)


@pytest.mark.parametrize('name', NAMES)
def test_forward_float32(name):
  with jax.default_matmul_precision('highest'):
    _check_forward(name, jnp.float32, F32_RTOL)


@pytest.mark.parametrize('name', [n for n in FLOAT64_NAMES if n in NAMES])
def test_forward_float64(name):
  with jax.enable_x64(True):
    _check_forward(name, jnp.float64, F64_RTOL)


@pytest.mark.parametrize('name', NAMES)
def test_names_shapes_and_parameter_count(name):
  """The PyTorch state_dict's names and shapes, both ways; mdistiller's parameter count."""
  z, state = _vectors(name)
  model = models.create_model(name, int(z['num_classes']))
  shapes = models.variable_shapes(model)
  num_params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(shapes['params']))
  assert num_params == int(z['num_params'])
  back = torch_import.flax_to_torch(torch_import.torch_to_flax(state, model), model)
  assert list(back) == list(state) or sorted(back) == sorted(state)
  for key, value in state.items():
    if not key.endswith('num_batches_tracked'):
      np.testing.assert_array_equal(back[key], value, err_msg=key)
  # Every family exposes the same kinds of features, with static shapes.
  feats = models.feature_shapes(model)
  assert {'logits', 'stem', 'stage1', 'pooled'} <= set(feats), sorted(feats)


@pytest.mark.parametrize('name', BFLOAT16_NAMES)
def test_bfloat16_forward_follows_float32(name):
  """compute_dtype=bfloat16 in every family: bfloat16 activations, float32 parameters."""
  model32 = models.create_model(name, 10)
  model16 = models.create_model(name, 10, dtype=jnp.bfloat16)
  variables = models.init_variables(model32, jax.random.key(0))
  x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
  # Eval mode: in train mode at initialisation, BatchNorm rescales channels whose batch
  # variance is near bfloat16's rounding (depthwise convolutions), and the two differ
  # by up to 25% (MobileNetV2) while both are right.
  logits32, _ = model32.apply(variables, x, train=False)
  logits16, features16 = model16.apply(variables, x, train=False)
  assert logits16.dtype == jnp.bfloat16 and features16['pooled'].dtype == jnp.bfloat16
  assert jax.tree.leaves(variables['params'])[0].dtype == jnp.float32
  assert rel_err(logits16, logits32) < 0.02
  (train16, _), _ = model16.apply(variables, x, train=True, mutable=['batch_stats'])
  assert bool(jnp.all(jnp.isfinite(train16)))


@pytest.mark.parametrize('name,message', [
    ('wrn_15_2', r"model 'wrn_15_2': depth 15 is not 6n\+4"),
    ('vgg12', r"model 'vgg12': depth 12 is not one of \[8, 11, 13, 16, 19\]"),
    ('ResNet20', r"model 'ResNet20': depth 20 is not one of"),
    ('ShuffleV2_3', r"model 'ShuffleV2_3': size 3 is not one of"),
    ('resnet8x3', r"unknown model 'resnet8x3'; expected one of: 'resnet<depth>'.*'wrn_<depth>"),
])
def test_bad_names_say_the_rule(name, message):
  with pytest.raises(ValueError, match=message):
    models.create_model(name, 10)
