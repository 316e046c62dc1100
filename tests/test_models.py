"""Models: shapes, sizes, init, names, dtypes, cross-device BatchNorm, scanned and unrolled
blocks (parity: test_parity.py)."""
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax import models
from kd_jax.models import layers
from tests.conftest import import_reference, load_parity, rel_err

# Counted by hand from the architectures; He et al.'s ResNet-20/56/110 for CIFAR-10
# (resnet<depth>_a) are the 0.27M / 0.85M / 1.7M of the literature.
@pytest.mark.parametrize('scan_blocks', [True, False])
@pytest.mark.parametrize('name,num_classes,params', [
    ('resnet_32_20', 10, 274_394), ('resnet_32_20', 100, 280_244),
    ('resnet_32_110', 10, 1_732_634), ('resnet20_a', 10, 269_722), ('resnet56_a', 10, 853_018),
    ('resnet56_a', 100, 858_868), ('resnet110_a', 10, 1_727_962),
    # mdistiller's (projection shortcuts), as tests/data/zoo counts them
    ('resnet20', 100, 278_324), ('resnet32x4', 100, 7_433_860)])
def test_parameter_counts(name, num_classes, params, scan_blocks):
  shapes = models.variable_shapes(models.create_model(name, num_classes, scan_blocks=scan_blocks))
  assert sum(x.size for x in jax.tree.leaves(shapes['params'])) == params


@pytest.mark.parametrize('name,sizes', [('resnet_32_8', (28, 28, 14, 7)),
                                        ('resnet_32_20', (28, 28, 14, 7)),
                                        ('resnet20', (32, 32, 16, 8)),
                                        ('resnet8_a', (32, 32, 16, 8))])
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


@pytest.mark.parametrize('name', ['resnet_20', 'alexnet', 'resnet'])
def test_unknown_model_names_list_the_families(name):
  with pytest.raises(ValueError, match=f"unknown model '{name}'; expected one of: .*6n\\+2"):
    models.create_model(name, 10)


@pytest.mark.parametrize('name', ['resnet_32_21', 'resnet_32_2', 'resnet9'])
def test_impossible_depth_names_value_and_rule(name):
  with pytest.raises(ValueError, match=f"model '{name}': depth \\d+ is not 6n\\+2"):
    models.create_model(name, 10)


def test_cross_device_batch_norm_equals_global_batch():
  # Two blocks per stage, so the statistics are also averaged inside a scanned stage.
  model = models.create_model('resnet_32_14', 10)
  sharded = models.create_model('resnet_32_14', 10, axis_name='batch')
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


def test_scanned_layout():
  shapes = models.variable_shapes(models.create_model('resnet_32_20', 10))
  unrolled = models.variable_shapes(models.create_model('resnet_32_20', 10, scan_blocks=False))
  for collection in ('params', 'batch_stats'):
    assert sorted(shapes[collection]) == sorted(
        ['bn1', 'layer1_0', 'layer1_blocks', 'layer2_0', 'layer2_blocks', 'layer3_0',
         'layer3_blocks'] + (['conv1', 'fc'] if collection == 'params' else []))
    assert sorted(unrolled[collection]) == sorted(
        ['bn1', *(f'layer{s}_{j}' for s in (1, 2, 3) for j in range(3))]
        + (['conv1', 'fc'] if collection == 'params' else []))
  assert shapes['params']['layer2_blocks']['conv1']['kernel'].shape == (2, 3, 3, 32, 32)
  assert shapes['batch_stats']['layer3_blocks']['bn2']['var'].shape == (2, 64)
  one_block = models.variable_shapes(models.create_model('resnet_32_8', 10))
  assert not any(k.endswith('_blocks') for k in one_block['params'])


def test_stack_and_unstack_blocks_are_inverses():
  shapes = models.variable_shapes(models.create_model('resnet_32_20', 10, scan_blocks=False))
  rng = np.random.default_rng(0)
  unrolled = jax.tree.map(lambda s: rng.standard_normal(s.shape), shapes)  # float64 numpy
  unrolled['other'] = {'layer1_1': np.zeros(3)}  # not a scanned collection: passes through
  stacked = models.stack_blocks(unrolled)
  scanned = models.variable_shapes(models.create_model('resnet_32_20', 10))
  assert jax.tree.map(lambda a: (a.shape, a.dtype), {k: stacked[k] for k in scanned}) == \
      jax.tree.map(lambda s: (s.shape, np.dtype('float64')), scanned)
  assert all(isinstance(a, np.ndarray) for a in jax.tree.leaves(stacked))
  np.testing.assert_array_equal(stacked['params']['layer2_blocks']['conv2']['kernel'][1],
                                unrolled['params']['layer2_2']['conv2']['kernel'])
  assert stacked['other'] is unrolled['other']
  back = models.unstack_blocks(stacked)
  assert jax.tree.structure(back) == jax.tree.structure(unrolled)
  jax.tree.map(np.testing.assert_array_equal, back, unrolled)
  # Each is the identity on the other's output, and works on a part of the collections.
  jax.tree.map(np.testing.assert_array_equal, models.stack_blocks(stacked), stacked)
  jax.tree.map(np.testing.assert_array_equal, models.unstack_blocks(unrolled), unrolled)
  jax.tree.map(np.testing.assert_array_equal,
               models.stack_blocks({'batch_stats': unrolled['batch_stats']}),
               {'batch_stats': stacked['batch_stats']})
  for variables in (stacked, unrolled):
    assert models.to_layout_of(variables, scanned)['params'].keys() == stacked['params'].keys()
    assert models.to_layout_of(variables, shapes)['params'].keys() == unrolled['params'].keys()


@pytest.mark.parametrize('name,unroll_blocks', [
    ('resnet_32_14', 4), ('resnet14', 4), ('resnet_32_8', 4), ('resnet_32_14', 0)])
def test_scanned_blocks_compute_what_unrolled_blocks_do(name, unroll_blocks):
  """Eval outputs; train outputs, batch statistics and gradients, with the scans as
  loops (unroll_blocks=0) or unrolled in the program. In float64: XLA fuses a scanned
  block differently, so float32 results can differ in the last bits."""
  unrolled = models.create_model(name, 10, scan_blocks=False)
  scanned = models.create_model(name, 10, unroll_blocks=unroll_blocks)
  with jax.enable_x64(True):
    variables = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64),
                             models.init_variables(unrolled, jax.random.key(0)))
    # Running statistics that differ per block, so a mixed-up order would show.
    keys = iter(jax.random.split(jax.random.key(2), len(jax.tree.leaves(variables))))
    variables['batch_stats'] = jax.tree.map(
        lambda a: a + jax.random.uniform(next(keys), a.shape, a.dtype), variables['batch_stats'])
    x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3), jnp.float64)

    def evaluate(model, variables):
      logits, features = jax.jit(model.apply, static_argnames='train')(variables, x, train=False)
      return {'logits': logits, **features}

    def train(model, variables):
      def loss(params):
        (logits, features), updates = model.apply(
            {'params': params, 'batch_stats': variables['batch_stats']}, x, train=True,
            mutable=['batch_stats'])
        total = jnp.sum(jnp.sin(logits)) + sum(jnp.sum(jnp.sin(f)) for f in features.values())
        return total, ({'logits': logits, **features}, updates['batch_stats'])
      return jax.jit(jax.grad(loss, has_aux=True))(variables['params'])

    stacked = models.stack_blocks(variables)
    grads, (outputs, stats) = train(scanned, stacked)
    want_grads, (want_outputs, want_stats) = train(unrolled, variables)
    assert set(outputs) == {'logits', 'stem', 'stage1', 'stage2', 'stage3', 'pooled',
                            'preact_stage1', 'preact_stage2', 'preact_stage3'}
    assert not np.allclose(jax.tree.leaves(stats)[-1],  # the statistics really moved
                           jax.tree.leaves(stacked['batch_stats'])[-1])
    for got, want in [(evaluate(scanned, stacked), evaluate(unrolled, variables)),
                      (outputs, want_outputs),
                      (stats, models.stack_blocks({'batch_stats': want_stats})['batch_stats']),
                      (grads, models.stack_blocks({'params': want_grads})['params'])]:
      assert jax.tree.structure(got) == jax.tree.structure(want)
      # Features reach 1e3 here; the preact carry of the scan rounds differently (1e-12).
      jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-9),
                   got, want)


@pytest.mark.parametrize('name,unroll_blocks,loops', [
    ('resnet_32_20', 4, False), ('resnet_32_20', 1, True), ('resnet_32_110', 4, True)])
def test_short_scans_are_unrolled(name, unroll_blocks, loops):
  """A stage scan of at most unroll_blocks blocks leaves no loop in the program."""
  model = models.create_model(name, 10, unroll_blocks=unroll_blocks)
  variables = models.variable_shapes(model)
  lowered = jax.jit(functools.partial(model.apply, train=False)).lower(
      variables, jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32))
  assert ('stablehlo.while' in lowered.as_text()) == loops


def test_gradient_convolutions_are_nhwc():
  """XLA:CPU runs convolutions of other layouts inside a loop with a naive kernel, many
  times slower (jax-ml/jax#12868); layers.nhwc_conv keeps the gradient's convolutions NHWC."""
  model = models.create_model('resnet_32_20', 10)

  def loss(params, batch_stats, x):
    (logits, _), _ = model.apply({'params': params, 'batch_stats': batch_stats}, x,
                                 train=True, mutable=['batch_stats'])
    return jnp.sum(logits)

  variables = models.variable_shapes(model)
  # Compiled for XLA:CPU whatever the default backend (every JAX install has a CPU).
  with jax.default_device(jax.devices('cpu')[0]):
    hlo = jax.jit(jax.grad(loss)).lower(variables['params'], variables['batch_stats'],
                                        jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32))
    labels = re.findall(r'dim_labels=([^,\s]+)', hlo.compile().as_text())
  assert labels and set(labels) == {'b01f_01io->b01f'}, set(labels)


@pytest.mark.parametrize('size,c_in,c_out,k,stride,pad,groups', [
    (32, 3, 16, 7, 1, 1, 1), (28, 16, 32, 3, 2, 1, 1), (28, 16, 32, 1, 2, 0, 1),
    (32, 16, 32, 3, 2, 1, 1), (9, 4, 4, 3, 2, 1, 1), (7, 8, 8, 3, 1, 1, 1),
    # strides larger than the kernel or than the padding, uneven padding: every phase case
    (10, 4, 6, 1, 3, 0, 1), (11, 3, 5, 2, 2, 0, 1), (12, 3, 5, 5, 3, 2, 1), (8, 2, 3, 3, 2, 0, 1),
    # ShuffleNet's grouped 1x1, MobileNetV2's and ShuffleNet's depthwise 3x3
    (8, 12, 24, 1, 1, 0, 3), (9, 6, 6, 3, 2, 1, 6), (8, 6, 6, 3, 1, 1, 6)])
@pytest.mark.parametrize('wgrad_chunk', [5, 1000])
def test_nhwc_conv_gradient_equals_autodiff(size, c_in, c_out, k, stride, pad, groups,
                                            wgrad_chunk, monkeypatch):
  """Every convolution of the models (7x7 stem, 3x3 and 1x1 of stride 1 and 2, even and
  odd sizes, grouped and depthwise): the hand-written gradient is autodiff's, in float64,
  with the kernel's gradient summed over chunks of examples (ragged here) as on XLA:CPU,
  or in one piece; grouped ones also in their XLA:CPU form (_grouped_cpu_form)."""
  monkeypatch.setattr(layers, 'WGRAD_CPU_CHUNK', wgrad_chunk)
  with jax.enable_x64(True):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(12, size, size, c_in)))
    w = jnp.asarray(rng.normal(size=(k, k, c_in // groups, c_out)))
    spec = ('NHWC', 'HWIO', 'NHWC')
    args = ((stride, stride), ((pad, pad), (pad, pad)))
    reference = lambda x, w: jax.lax.conv_general_dilated(x, w, *args, dimension_numbers=spec,
                                                          feature_group_count=groups)
    ours = lambda x, w: layers.nhwc_conv(
        x, w, *args, lhs_dilation=(1, 1), rhs_dilation=(1, 1), feature_group_count=groups,
        precision=None, dimension_numbers=jax.lax.conv_dimension_numbers(x.shape, w.shape, spec))
    y_ref, vjp_ref = jax.vjp(reference, x, w)
    dy = jnp.asarray(rng.normal(size=y_ref.shape))
    # On XLA:CPU grouped convolutions take their plain-XLA form: check the custom-gradient
    # convolution that other backends run too.
    plain = lambda x, w: layers._conv(x, w, *args, groups)  # pylint: disable=protected-access
    for fn in [ours] + ([plain] if groups > 1 else []):
      y, vjp = jax.vjp(fn, x, w)
      np.testing.assert_allclose(y, y_ref, rtol=1e-12, atol=1e-12)
      for got, want in zip(vjp(dy), vjp_ref(dy)):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    # Both forms of each gradient, whichever backend runs here: XLA:CPU's (per-phase
    # input gradient, 1x1 kernel gradient as a matmul) and the other backends'.
    dx_want, dw_want = vjp_ref(dy)
    forms = [layers._input_grad_dilated(dy, w, x.shape[1:3], *args, groups)]
    if groups == 1 and stride > 1:
      forms.append(layers._input_grad_phases(dy, w, x.shape[1:3], *args))
    for got in forms:
      np.testing.assert_allclose(got, dx_want, rtol=1e-12, atol=1e-12)
    forms = [layers._kernel_grad(x, dy, w.shape, *args, groups, chunk)
             for chunk in (wgrad_chunk, x.shape[0])]
    if groups == 1 and k == 1:
      forms.append(layers._kernel_grad_1x1(x, dy, *args))
    for got in forms:
      np.testing.assert_allclose(got, dw_want, rtol=1e-12, atol=1e-12)
