"""ReviewKD (mdistiller), AB, FT and FSP (RepDistiller) against the originals' own code
(tests/data/methods, see its README): losses, gradients with respect to the student's
features and the connectors' parameters, and the connectors' BatchNorm statistics.

The files are float64 computations of the originals from float32 inputs and weights;
these tests run in float64 too, so the bounds are the files' float32 storage of the
gradients. Gradients stored as slices (spec.weight_grad_slices) or for the first
examples only are compared on what is stored."""
import glob
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax import methods
from kd_jax.methods import distiller
from tests import golden
from tests.conftest import rel_err

VECTORS_DIR = os.environ.get('KD_METHOD_VECTORS_DIR',
                             os.path.join(os.path.dirname(__file__), 'data', 'methods'))


def _files(method):
  return sorted(os.path.basename(p) for p in
                glob.glob(os.path.join(VECTORS_DIR, f'{method}__*.npz')))


def _load(name):
  with np.load(os.path.join(VECTORS_DIR, name)) as f:
    z = {k: f[k] for k in f.files}
  return z, json.loads(str(z['spec']))


def _features(z, side):
  prefix = f'{side}/'
  return {k[len(prefix):]: jnp.asarray(v, jnp.float64) for k, v in z.items()
          if k.startswith(prefix) and k != f'{side}/logits'}


def _ctx(student, teacher):
  shapes = lambda f: {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in f.items()}
  return methods.Context(student=shapes(student), teacher=shapes(teacher), num_classes=100,
                         train_size=100, steps_per_epoch=1)


def _batch(z):
  labels = jnp.asarray(z['labels'], jnp.int32)
  return {'label': labels, 'index': jnp.arange(len(labels)), 'key': jax.random.key(0)}


def _compare_grads(got, z, prefix, tol=1e-6):
  """got: {state_dict key: torch-layout gradient}; every stored gradient is compared."""
  zero = set((json.loads(str(z['spec'])).get('zero_gradients') or {}).get('keys', []))
  checked = 0
  for key, value in z.items():
    for kind in ('weights/', 'weights_slice/'):
      if key.startswith(prefix + kind):
        name = key[len(prefix + kind):]
        mine = np.asarray(got[name])[:len(value)]
        if key in zero:
          assert np.max(np.abs(mine)) < 1e-10, name
        else:
          assert rel_err(mine, value) < tol, (name, rel_err(mine, value))
        checked += 1
  return checked


def _compare_student_grads(grads, z, tol=1e-6):
  stored = {k[len('grad/student/'):]: v for k, v in z.items() if k.startswith('grad/student/')}
  assert stored
  for name, value in stored.items():
    assert rel_err(np.asarray(grads[name])[:len(value)], value) < tol, name


def _compare_stats(got, z):
  """got: {state_dict key: running statistic}."""
  stored = {k[len('state_after/'):]: v for k, v in z.items()
            if k.startswith('state_after/') and not k.endswith('num_batches_tracked')}
  assert stored
  for name, value in stored.items():
    assert rel_err(got[name], value) < 1e-6, name


# ------------------------------------------------------------------------------ reviewkd

@pytest.mark.parametrize('name', _files('reviewkd'))
def test_reviewkd_matches_mdistiller(name):
  from kd_jax.methods import reviewkd  # pylint: disable=g-import-not-at-top
  z, spec = _load(name)
  hyper = spec['hyper_parameters']
  with jax.enable_x64(True):
    student, teacher = _features(z, 'student'), _features(z, 'teacher')
    ctx = _ctx(student, teacher)
    # The channels and sizes derived from the shapes are the original's config.
    in_c, out_c, shapes, out_shapes, mid = reviewkd.layout(ctx, 512)
    assert (in_c, out_c, shapes, out_shapes, mid) == (
        hyper['in_channels'], hyper['out_channels'], hyper['shapes'], hyper['out_shapes'],
        hyper['mid_channel'])
    d = distiller.build('reviewkd', {'reviewkd': {
        'weight': hyper['reviewkd_weight'], 'warmup_epochs': hyper['warmup_epochs']}}, ctx)
    state_dict = golden.state_dict_values(spec['weights_seed'], spec['weights_spec'])
    variables = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64),
                             reviewkd.from_torch(state_dict))
    progress = {'epoch': jnp.int32(hyper['epoch']), 'step': jnp.int32(0)}
    batch = _batch(z)

    def loss(params, student):
      terms, new = d.apply({'params': {'reviewkd': params},
                            'batch_stats': {'reviewkd': variables['batch_stats']}},
                           student, teacher, batch, progress, train=True)
      return terms['reviewkd'], new

    (value, new), (g_params, g_student) = jax.jit(jax.value_and_grad(
        loss, argnums=(0, 1), has_aux=True))(variables['params'], student)
  assert rel_err(value, z['loss/kd']) < 1e-12, (float(value), float(z['loss/kd']))
  _compare_student_grads(g_student, z)
  flat = lambda tree: {reviewkd.to_torch_key(tuple(p.key for p in path)): leaf for path, leaf in
                       jax.tree_util.tree_flatten_with_path(tree)[0]}
  got = {k: (v.transpose(3, 2, 0, 1) if v.ndim == 4 else v) for k, v in flat(g_params).items()}
  assert _compare_grads(got, z, 'grad/') == len(got)
  _compare_stats(flat(new['batch_stats']['reviewkd']), z)


def test_reviewkd_nearest_is_torch_nearest():
  """src = floor(dst * in / out): upsampling repeats, 1x1 broadcasts, non-integer ratios
  pick as PyTorch does (checked against F.interpolate by hand: 3 -> 5 takes 0,0,1,1,2)."""
  from kd_jax.methods import reviewkd  # pylint: disable=g-import-not-at-top
  x = jnp.arange(9.0).reshape(1, 3, 3, 1)
  got = reviewkd.nearest(x, 5)[0, :, 0, 0]
  np.testing.assert_array_equal(got, [0, 0, 3, 3, 6])
  np.testing.assert_array_equal(reviewkd.nearest(x[:, :1, :1], 4), jnp.zeros((1, 4, 4, 1)))


def _to_torch_grads(tree, key_of, transposed=lambda key: False):
  """{state_dict key: torch-layout array} of a Flax gradient tree."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    key = key_of(tuple(p.key for p in path))
    leaf = np.asarray(leaf)
    if leaf.ndim == 4:
      leaf = leaf.transpose(2, 3, 0, 1) if transposed(key) else leaf.transpose(3, 2, 0, 1)
    out[key] = leaf
  return out


# ------------------------------------------------------------------------------------ ab

def _ab_key(path):
  connector, module, what = path
  what = {'kernel': 'weight', 'scale': 'weight', 'mean': 'running_mean',
          'var': 'running_var'}.get(what, what)
  return f'connector.connectors.{connector[9:]}.{module}.{what}'


@pytest.mark.parametrize('name', _files('ab'))
def test_ab_matches_repdistiller(name):
  from kd_jax.methods import ab  # pylint: disable=g-import-not-at-top
  z, spec = _load(name)
  with jax.enable_x64(True):
    student, teacher = _features(z, 'student'), _features(z, 'teacher')
    d = distiller.build('ab', {'ab': {'margin': spec['hyper_parameters']['margin']}},
                        _ctx(student, teacher))
    module = dict(d.parts)['ab']
    # ConvTranspose2d where the student's map is half the teacher's (ConvReg's rule).
    transposed = tuple(i for i, k in enumerate(sorted(student)) if 2 * student[k].shape[1] ==
                       teacher[k].shape[1])
    state_dict = golden.state_dict_values(spec['weights_seed'], spec['weights_spec'])
    variables = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64),
                             ab.from_torch(state_dict, transposed))
    batch = _batch(z)

    def loss(params, student):
      terms, new = module.apply({'params': params, 'batch_stats': variables['batch_stats']},
                                student, teacher, batch, None, train=True,
                                method='init_terms', mutable=['batch_stats'])
      return sum(terms.values()), (terms, new)

    def both(params, student):  # one compilation for the two entry points
      main = module.apply({'params': params, 'batch_stats': variables['batch_stats']},
                          student, teacher, batch, None, train=True, mutable=['batch_stats'])[0]
      return jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, student), main

    ((value, (terms, new)), (g_params, g_student)), main = jax.jit(both)(
        variables['params'], student)
  assert rel_err(value, z['loss/kd']) < 1e-12
  assert rel_err(main['ab'], z['loss/kd']) < 1e-12  # weight 1: the joint form's term
  for i in (1, 2, 3):
    assert rel_err(terms[f'ab_stage{i}'], z[f'loss/kd_stage{i}']) < 1e-12
  _compare_student_grads(g_student, z)
  is_transposed = lambda key: int(key.split('.')[2]) in transposed
  got = _to_torch_grads(g_params, _ab_key, is_transposed)
  assert _compare_grads(got, z, 'grad/') == len(got)
  if got:
    _compare_stats(_to_torch_grads(new['batch_stats'], _ab_key), z)


# ------------------------------------------------------------------------------------ ft

@pytest.mark.parametrize('name', _files('ft'))
def test_ft_matches_repdistiller(name):
  from kd_jax.methods import ft  # pylint: disable=g-import-not-at-top
  z, spec = _load(name)
  with jax.enable_x64(True):
    student, teacher = _features(z, 'student'), _features(z, 'teacher')
    d = distiller.build('ft', {'ft': {'weight': spec['hyper_parameters']['beta']}},
                        _ctx(student, teacher))
    module = dict(d.parts)['ft']
    state_dict = golden.state_dict_values(spec['weights_seed'], spec['weights_spec'])
    variables = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), ft.from_torch(state_dict))
    # The variables the module makes are exactly the original's.
    made = jax.eval_shape(lambda: module.init(
        {'params': jax.random.key(0)}, student, teacher, _batch(z), None, train=False))
    assert jax.tree.map(lambda a: a.shape, dict(made)) == jax.tree.map(jnp.shape, variables)
    batch = _batch(z)

    def main(params, state, student):
      terms, new = module.apply({'params': params, 'batch_stats': variables['batch_stats'],
                                 'method_state': state}, student, teacher, batch, None,
                                train=True, mutable=['batch_stats'])
      return terms['ft'], new

    def init(state):
      terms = module.apply({'params': variables['params'], 'method_state': state,
                            'batch_stats': variables['batch_stats']}, student, teacher,
                           batch, None, train=True, method='init_terms')
      return terms['ft_reconstruction']

    def both(params, state, student):  # one compilation for the two stages
      return (jax.value_and_grad(main, argnums=(0, 1, 2), has_aux=True)(params, state, student),
              jax.value_and_grad(init)(state))

    ((value, new), grads), (rec, g_init) = jax.jit(both)(
        variables['params'], variables['method_state'], student)
  assert rel_err(value, z['loss/kd']) < 1e-12
  assert rel_err(rec, z['loss/init_reconstruction']) < 1e-12
  _compare_student_grads(grads[2], z)
  transposed = lambda key: '.decoder.' in key
  got = {**_to_torch_grads(grads[0], ft.to_torch_key, transposed),
         **{k: v for k, v in _to_torch_grads(grads[1], ft.to_torch_key, transposed).items()
            if '.decoder.' not in k}}  # the decoder is off the main loss's path
  assert _compare_grads(got, z, 'grad/') == len(got)
  got_init = _to_torch_grads(g_init, ft.to_torch_key, transposed)
  assert _compare_grads(got_init, z, 'grad_init/') == len(got_init) == 12
  _compare_stats(_to_torch_grads(new['batch_stats'], ft.to_torch_key), z)


# ----------------------------------------------------------------------------------- fsp

@pytest.mark.parametrize('name', _files('fsp'))
def test_fsp_repdistiller_form_matches_repdistiller(name):
  z, _ = _load(name)
  with jax.enable_x64(True):
    student, teacher = _features(z, 'student'), _features(z, 'teacher')
    d = distiller.build('fsp', {'fsp': {'form': 'repdistiller'}}, _ctx(student, teacher))
    module = dict(d.parts)['fsp']
    batch = _batch(z)
    init = lambda s: module.apply({}, s, teacher, batch, None, method='init_terms')
    terms = init(student)
    grads = jax.jit(jax.grad(lambda s: sum(init(s).values())))(student)
    main = module.apply({}, student, teacher, batch, None)
  for i in (1, 2, 3):
    assert rel_err(terms[f'fsp_pair{i}'], z[f'loss/kd_pair{i}']) < 1e-12
  assert rel_err(main['fsp'], z['loss/kd']) < 1e-12  # weight 1: the joint form's term
  _compare_student_grads(grads, z)


def test_fsp_form_is_checked_and_repdistiller_needs_equal_channels():
  shapes = lambda c: {k: jax.ShapeDtypeStruct((2, 8, 8, c), jnp.float32)
                      for k in ('stem', 'stage1', 'stage2', 'stage3')}
  ctx = _ctx({}, {})
  with pytest.raises(ValueError, match='form'):
    distiller.build('fsp', {'fsp': {'form': 'mdistiller'}}, ctx)
  d = distiller.build('fsp', {'fsp': {'form': 'repdistiller'}}, ctx)
  s = {k: jnp.ones(v.shape) for k, v in shapes(4).items()}
  t = {k: jnp.ones(v.shape) for k, v in shapes(8).items()}
  with pytest.raises(ValueError, match='equal channels'):
    dict(d.parts)['fsp'].apply({}, s, t, {}, None)
