"""Feature methods against the originals' own code (tests/data/methods, see its README):
fitnet, at, sp, nst, pkt, rkd, vid (mdistiller) and cc (RepDistiller). Each file holds
the features the method reads, the original's loss, its gradients with respect to the
student's features and the connectors' weights (rebuilt from the file's seed), and the
connectors' BatchNorm statistics after the forward. The defaults of the methods' fields
are checked against the settings the files record from the originals' configs."""
import glob
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax import methods, torch_import
from kd_jax.methods import distiller, feature, rkd, vid
from tests import golden
from tests.conftest import rel_err

VECTORS_DIR = os.environ.get('KD_METHOD_VECTORS_DIR',
                             os.path.join(os.path.dirname(__file__), 'data', 'methods'))
METHODS = ('fitnet', 'at', 'sp', 'nst', 'pkt', 'rkd', 'cc', 'vid')
FILES = sorted(os.path.basename(p) for p in glob.glob(os.path.join(VECTORS_DIR, '*.npz'))
               if os.path.basename(p).split('__')[0] in METHODS)
# Relative L2 bounds in float32 (README, Numerics): PKT's KL of nearly equal distributions
# and SP's Gram rows of positive features cancel; everything else agrees to ~1e-6.
LOSS_RTOL = {'pkt': 1e-3, 'sp': 1e-4}
GRAD_RTOL = {'pkt': 1e-4, 'sp': 1e-4}
RTOL = 1e-5
# Where the file's own data is worse conditioned (torch's float32 rerun of the original
# is further than a tenth of the bound from its float64 result), 10x torch's error.
F32_MARGIN = 10


def _tol(spec, key, bound):
  torch_f32 = spec['torch_float32_vs_float64_relative_error'].get(key)
  return max(bound, F32_MARGIN * torch_f32) if isinstance(torch_f32, float) else bound

# The files' hyper_parameters (the originals' settings) -> the methods' fields.
FIELDS = {
    'fitnet': {'hint_layer': 'hint_layer', 'feat_weight': 'weight', 'ce_weight': 'ce_weight'},
    'at': {'feat_weight': 'beta', 'p': 'p', 'ce_weight': 'ce_weight'},
    'sp': {'feat_weight': 'weight', 'ce_weight': 'ce_weight'},
    'nst': {'feat_weight': 'weight', 'ce_weight': 'ce_weight'},
    'pkt': {'feat_weight': 'weight', 'ce_weight': 'ce_weight'},
    'rkd': {'feat_weight': 'weight', 'ce_weight': 'ce_weight', 'distance_weight':
            'distance_weight', 'angle_weight': 'angle_weight', 'pdist_eps': 'eps',
            'pdist_squared': 'squared'},
    'cc': {'beta': 'weight', 'feat_dim': 'feat_dim', 'gamma_ce': 'ce_weight'},
    'vid': {'feat_weight': 'weight', 'ce_weight': 'ce_weight', 'eps': 'eps',
            'init_pred_var': 'init_pred_var'},
}


def test_every_method_has_a_vectors_file():
  assert {name.split('__')[0] for name in FILES} == set(METHODS)


def _load(name):
  with np.load(os.path.join(VECTORS_DIR, name)) as f:
    z = {k: f[k] for k in f.files}
  return z, json.loads(str(z['spec']))


def _fields(method, hyper):
  fields = {FIELDS[method][k]: v for k, v in hyper.items() if k in FIELDS[method]}
  assert len(fields) == len(FIELDS[method]), (method, hyper)
  return fields


def _get(tree, path):
  for part in path:
    tree = tree[part]
  return tree


@pytest.mark.parametrize('name', FILES)
def test_feature_method_matches_the_original(name):
  z, spec = _load(name)
  method = name.split('__')[0]
  fields = _fields(method, spec['hyper_parameters'])
  # The originals' CIFAR-100 settings are the defaults.
  assert {k: methods.get(method).fields[k].default for k in fields} == fields
  if method == 'vid':
    fields['train_log_scale'] = True  # RepDistiller's form: the files hold their gradients
  as_f32 = lambda role: {f: jnp.asarray(z[f'{role}/{f}'], jnp.float32)
                         for f in spec['features'][role]}
  student, teacher = as_f32('student'), as_f32('teacher')
  shapes = lambda fs: {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in fs.items()}
  ctx = methods.Context(student=shapes(student), teacher=shapes(teacher), num_classes=100,
                        train_size=100, steps_per_epoch=1)
  d = distiller.build(method, {method: fields}, ctx)
  labels = jnp.asarray(z['labels'], jnp.int32)
  batch = {'label': labels, 'index': jnp.arange(len(labels)), 'key': jax.random.key(0)}
  progress = {'epoch': jnp.int32(1), 'step': jnp.int32(0)}

  # The connectors' weights as the generator drew them, in the modules' layout; the
  # modules' own variables only give the structure (an eager init would run the loss).
  shapes = jax.eval_shape(d.init, jax.random.key(0), student, teacher, batch, progress)
  loaded = feature.torch_connector_variables(
      golden.state_dict_values(spec['weights_seed'], spec['weights_spec']))
  variables = {}
  for collection, tree in shapes.items():
    want = jax.tree.map(lambda a: a.shape, tree.get(method, {}))
    got = jax.tree.map(np.shape, loaded.get(collection, {}))
    if method == 'vid' and collection == 'params':
      # Not in the state_dict (mdistiller: a plain list); mdistiller's values are stored.
      for i in range(len(spec['features']['student'])):
        got[f'log_scales_{i}'] = z[f'vid/log_scale{i}'].shape
        loaded['params'][f'log_scales_{i}'] = z[f'vid/log_scale{i}']
    assert got == want, (collection, got, want)
    variables[collection] = {method: jax.tree.map(jnp.asarray, loaded.get(collection, {}))}
  if method == 'vid':
    mdistiller = distiller.build(method, {method: {**fields, 'train_log_scale': False}}, ctx)

  def term(student, params, teacher):  # teacher an argument: XLA would constant-fold it
    terms, updates = d.apply({**variables, 'params': params}, student, teacher, batch, progress,
                             train=True)
    (value,) = terms.values()
    if method == 'vid':  # mdistiller's form: the same loss from constant variances
      params = {k: v for k, v in params[method].items() if not k.startswith('log_scales_')}
      updates['mdistiller'] = mdistiller.apply({'params': {method: params}}, student, teacher,
                                               batch, progress, train=True)[0]['vid']
    if method == 'rkd':
      updates['rkd_terms'] = rkd.rkd_terms(student['pooled'], teacher['pooled'])
    return value, updates

  with jax.default_matmul_precision('highest'):
    (value, updates), (grad_s, grad_w) = jax.jit(jax.value_and_grad(term, (0, 1), has_aux=True))(
        student, variables['params'], teacher)

  loss_rtol = LOSS_RTOL.get(method, RTOL)
  grad_rtol = GRAD_RTOL.get(method, RTOL)
  assert rel_err(value, z['loss/kd']) < _tol(spec, 'loss/kd', loss_rtol), (
      float(value), float(z['loss/kd']))
  for f in spec['features']['student']:
    key = f'grad/student/{f}'
    if key in z:
      assert rel_err(grad_s[f], z[key]) < _tol(spec, key, grad_rtol), (
          key, rel_err(grad_s[f], z[key]))
  zero = set(spec.get('zero_gradients', {}).get('keys', ()))
  stored = {k: v for k, v in z.items() if k.startswith(('grad/weights/', 'grad/weights_slice/'))}
  assert bool(stored) == bool(spec['weights_spec'])
  scale = np.sqrt(sum(np.sum(np.square(v.astype(np.float64))) for k, v in stored.items()
                      if k not in zero))
  slices = spec.get('weight_grad_slices', {}).get('n', {})
  for key, want in stored.items():
    torch_key = key.split('/', 2)[2]
    _, path = feature.flax_path(torch_key, want.ndim)
    got = torch_import.to_torch_layout(np.asarray(_get(grad_w[method], path)))
    got = got[:slices[key]] if key in slices else got
    assert got.shape == want.shape, key
    if key in zero:  # exactly 0 mathematically: float32 rounding against the others' size
      assert np.linalg.norm(got) < 1e-6 * scale, key
    else:
      assert rel_err(got, want) < _tol(spec, key, grad_rtol), (key, rel_err(got, want))
  state = {k[len('state_after/'):]: v for k, v in z.items() if k.startswith('state_after/')}
  for key, want in state.items():
    where = feature.flax_path(key, want.ndim)
    if where is not None:
      assert rel_err(_get(updates[where[0]][method], where[1]), want) < RTOL, key

  ce = -np.mean(jax.nn.log_softmax(z['student/logits'].astype(np.float64))[
      np.arange(len(labels)), z['labels']])
  assert rel_err(d.ce_weight * ce, z['loss/ce']) < RTOL
  if method == 'rkd':
    keys = ('loss/rkd_distance_unweighted', 'loss/rkd_angle_unweighted')
    for got, key in zip(updates['rkd_terms'], keys):
      assert abs(float(got) - z[key]) <= _tol(spec, key, RTOL) * abs(z[key]) + 1e-12, key
  if method == 'vid':
    assert rel_err(updates['mdistiller'], z['loss/kd']) < _tol(spec, 'loss/kd', RTOL)


def test_vid_variances_start_at_init_pred_var():
  """The variances start at init_pred_var, trained (RepDistiller) or not (mdistiller)."""
  shape = lambda c: jax.ShapeDtypeStruct((2, 4, 4, c), jnp.float32)
  ctx = methods.Context(student={'stage1': shape(3)}, teacher={'stage1': shape(5)},
                        num_classes=10, train_size=10, steps_per_epoch=1)
  trained = distiller.build('vid', {'vid': {'train_log_scale': True}}, ctx)
  variables = jax.jit(trained.init)(jax.random.key(0), *distiller.example_inputs(ctx, 2))
  log_scale = variables['params']['vid']['log_scales_0']
  np.testing.assert_allclose(jax.nn.softplus(log_scale) + 1e-5, np.full(5, 5.0), rtol=1e-6)
  np.testing.assert_allclose(log_scale, vid.initial_log_scale(5.0, 1e-5), rtol=1e-7)
  np.testing.assert_allclose(jax.nn.softplus(vid.initial_log_scale(5.0, 1e-5)) + 1e-5, 5.0,
                             rtol=1e-12)
  fixed = jax.eval_shape(distiller.build('vid', {}, ctx).init, jax.random.key(0),
                         *distiller.example_inputs(ctx, 2))
  assert set(fixed['params']['vid']) == {'regressors_0_0', 'regressors_0_2', 'regressors_0_4'}


def test_pairs_the_connectors_cannot_map_are_refused():
  shape = lambda h, c: jax.ShapeDtypeStruct((2, h, h, c), jnp.float32)
  ctx = methods.Context(student={'stage2': shape(4, 8)}, teacher={'stage2': shape(32, 8)},
                        num_classes=10, train_size=10, steps_per_epoch=1)
  with pytest.raises(ValueError, match='fitnet.*no ConvReg from a 4x4 student map'):
    distiller.build('fitnet', {}, ctx)
  with pytest.raises(ValueError, match="fitnet.*no 'stage3'"):
    distiller.build('fitnet', {'fitnet': {'hint_layer': 3}}, ctx)
  with pytest.raises(ValueError, match='cannot pool 12x12 maps to 8x8'):
    feature.pool_larger(jnp.zeros((1, 12, 12, 1)), jnp.zeros((1, 8, 8, 1)))


@pytest.mark.parametrize('dtype', [jnp.bfloat16, jnp.float32])
def test_terms_are_at_least_float32_whatever_the_features(dtype):
  """Traced only (no compilation): every method on bfloat16 or float32 outputs of a
  cross-family-like pair (student maps larger in stage1, smaller in stage2-3)."""
  shapes = {'student': {'stage1': (4, 16, 16, 12), 'stage2': (4, 8, 8, 24),
                        'stage3': (4, 4, 4, 48), 'pooled': (4, 48)},
            'teacher': {'stage1': (4, 8, 8, 8), 'stage2': (4, 16, 16, 16),
                        'stage3': (4, 8, 8, 32), 'pooled': (4, 32)}}
  struct = lambda role: {k: jax.ShapeDtypeStruct(s, dtype) for k, s in shapes[role].items()}
  ctx = methods.Context(student=struct('student'), teacher=struct('teacher'), num_classes=10,
                        train_size=10, steps_per_epoch=1)
  for method in METHODS:
    d = distiller.build(method, {}, ctx)
    _, _, batch, progress = distiller.example_inputs(ctx, 4)
    variables = jax.eval_shape(d.init, jax.random.key(0), ctx.student, ctx.teacher, batch,
                               progress)
    terms, _ = jax.eval_shape(lambda v, s, t: d.apply(v, s, t, batch, progress, train=True),
                              variables, ctx.student, ctx.teacher)
    assert [t.dtype for t in terms.values()] == [jnp.float32], method
