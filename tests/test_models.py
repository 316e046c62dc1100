"""Models: shapes, sizes, init, names, dtypes, cross-device BatchNorm (parity: test_parity.py)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax import models
from tests.conftest import import_reference, load_parity, rel_err

# Counted by hand from the architectures; He et al.'s ResNet-20/56/110 for CIFAR-10
# are the 0.27M / 0.85M / 1.7M of the literature.
@pytest.mark.parametrize('name,num_classes,params', [
    ('resnet_32_20', 10, 274_394), ('resnet_32_20', 100, 280_244),
    ('resnet_32_110', 10, 1_732_634), ('resnet20', 10, 269_722), ('resnet56', 10, 853_018),
    ('resnet56', 100, 858_868), ('resnet110', 10, 1_727_962)])
def test_parameter_counts(name, num_classes, params):
  shapes = models.variable_shapes(models.create_model(name, num_classes))
  assert sum(x.size for x in jax.tree.leaves(shapes['params'])) == params


@pytest.mark.parametrize('name,sizes', [('resnet_32_8', (28, 28, 14, 7)),
                                        ('resnet_32_20', (28, 28, 14, 7)),
                                        ('resnet20', (32, 32, 16, 8)),
                                        ('resnet8', (32, 32, 16, 8))])
def test_output_shapes(name, sizes):
  model = models.create_model(name, 10)
  variables = models.variable_shapes(model)
  x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
  logits, features = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, x)
  assert logits.shape == (2, 10)
  assert features['pooled'].shape == (2, 64)
  for key, size, width in zip(('stem', 'stage1', 'stage2', 'stage3'), sizes, (16, 16, 32, 64)):
    assert features[key].shape == (2, size, size, width), key


def test_init_follows_the_reference():
  model = models.create_model('resnet_32_8', 100)
  params = models.init_variables(model, jax.random.key(0))['params']
  kernel = np.asarray(params['layer3_0']['conv2']['kernel'])  # 3x3, 64 -> 64
  assert abs(kernel.std() / np.sqrt(2.0 / (3 * 3 * 64)) - 1) < 0.05  # kaiming fan_out
  assert np.abs(kernel).max() > 2.5 * kernel.std()  # untruncated normal
  fc = np.asarray(params['fc']['kernel'])
  assert np.abs(fc).max() <= np.sqrt(6.0 / (64 + 100))  # xavier uniform
  assert np.abs(np.asarray(params['fc']['bias'])).max() <= 1 / 8  # U(-1/sqrt(64), 1/sqrt(64))
  assert np.all(np.asarray(params['bn1']['scale']) == 1)


def test_bfloat16_compute_keeps_float32_parameters():
  vectors = load_parity('model_resnet_32_20_c100.npz')
  _, variables = import_reference(vectors, 'state', 'resnet_32_20')
  model = models.create_model('resnet_32_20', 100, dtype=jnp.bfloat16)
  logits, features = model.apply(variables, jnp.asarray(vectors['x']), train=False)
  assert features['stage2'].dtype == jnp.bfloat16 and logits.dtype == jnp.bfloat16
  assert rel_err(logits.astype(jnp.float32), vectors['eval/logits']) < 0.05
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(variables))


def test_float64_variables_give_a_float64_forward():
  vectors = load_parity('model_resnet_32_20_c100.npz')
  model, variables = import_reference(vectors, 'state', 'resnet_32_20')
  with jax.enable_x64(True):
    variables = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), variables)
    logits, features = model.apply(variables, jnp.asarray(vectors['x'], jnp.float64), train=True,
                                   mutable=['batch_stats'])[0]
    assert logits.dtype == features['stem'].dtype == jnp.float64
    assert rel_err(logits, vectors['train/logits']) < 1e-6


@pytest.mark.parametrize('name', ['resnet_32_21', 'resnet_32_2', 'resnet_20', 'vgg16', 'resnet'])
def test_bad_model_names(name):
  with pytest.raises(ValueError, match=f"unknown model '{name}'.*6n\\+2"):
    models.create_model(name, 10)


def test_cross_device_batch_norm_equals_global_batch():
  model = models.create_model('resnet_32_8', 10)
  sharded = models.create_model('resnet_32_8', 10, axis_name='batch')
  variables = models.init_variables(model, jax.random.key(1))
  x = jax.random.normal(jax.random.key(2), (4, 32, 32, 3))

  def forward(m, x):
    return m.apply(variables, x, train=True, mutable=['batch_stats'])

  (logits, _), stats = forward(model, x)
  (logits_v, _), stats_v = jax.vmap(lambda x: forward(sharded, x), axis_name='batch')(
      x.reshape(2, 2, 32, 32, 3))
  np.testing.assert_allclose(logits_v.reshape(4, 10), logits, rtol=1e-4, atol=1e-5)
  for a, b in zip(jax.tree.leaves(stats), jax.tree.leaves(stats_v)):
    np.testing.assert_allclose(b[0], a, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(b[1], a, rtol=1e-4, atol=1e-6)
