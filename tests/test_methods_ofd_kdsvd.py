"""kdsvd and ofd against the originals' own code (tests/data/methods, see its README): loss
terms and gradients on the files' features, with the files' connector weights. Seeds and
batch sizes are read from the files."""
import glob
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax import methods
from kd_jax.methods import distiller
from tests.conftest import rel_err

VECTORS_DIR = os.environ.get('KD_METHOD_VECTORS_DIR',
                             os.path.join(os.path.dirname(__file__), 'data', 'methods'))


def _files(*prefixes):
  return sorted(os.path.basename(p) for p in glob.glob(os.path.join(VECTORS_DIR, '*.npz'))
                if os.path.basename(p).split('__')[0] in prefixes)


def _load(name):
  with np.load(os.path.join(VECTORS_DIR, name)) as f:
    z = {k: f[k] for k in f.files}
  return z, json.loads(str(z['spec']))


def _ctx(z, train_size=100):
  shapes = lambda side: {k.split('/', 1)[1]: jax.ShapeDtypeStruct(v.shape, jnp.float32)
                         for k, v in z.items() if k.startswith(side + '/')
                         and v.ndim >= 2 and 'bn_before_relu' not in k}
  return methods.Context(student=shapes('student'), teacher=shapes('teacher'),
                         num_classes=z['student/logits'].shape[1], train_size=train_size,
                         steps_per_epoch=1)


def _batch(z):
  labels = jnp.asarray(z['labels'], jnp.int32)
  return {'label': labels, 'index': jnp.zeros_like(labels), 'key': jax.random.key(0)}


PROGRESS = {'epoch': jnp.int32(1), 'step': jnp.int32(0)}


def _weight_grads(z, grads_torch):
  """(got, want) pairs of weight gradients, torch layout, sliced as the file stores them."""
  pairs = []
  for key, got in grads_torch.items():
    if f'grad/weights/{key}' in z:
      pairs.append((key, got, z[f'grad/weights/{key}']))
    else:
      want = z[f'grad/weights_slice/{key}']
      pairs.append((key, got[:want.shape[0]], want))
  return pairs


@pytest.mark.parametrize('name', _files('kdsvd', 'kdsvd_rd'))
def test_kdsvd_matches_the_original(name):
  """mdistiller's form in float32 (its SVD is float32: ~1e-3, see the README's numerics),
  RepDistiller's in float64. The teacher's SVD signs are set to the file's (torch's)."""
  from kd_jax.methods import kdsvd  # pylint: disable=g-import-not-at-top
  z, spec = _load(name)
  form = 'repdistiller' if name.startswith('kdsvd_rd') else 'mdistiller'
  k = spec['hyper_parameters']['k']
  weight = spec['hyper_parameters'].get('feat_weight', spec['hyper_parameters'].get('beta'))
  dtype, tol, grad_tol = ((jnp.float32, 1e-3, 1e-3) if form == 'mdistiller'
                          else (jnp.float64, 1e-9, 1e-6))
  with jax.enable_x64(dtype == jnp.float64):
    feats = lambda side: [jnp.asarray(z[f'{side}/{n}'], dtype) for n in kdsvd.STAGES]
    reference = [jnp.asarray(z[f'kdsvd/teacher_v{i}'], dtype) for i in (1, 2, 3)]
    teacher = feats('teacher')

    d = distiller.build('kdsvd', {'kdsvd': {'form': form, 'k': k, 'weight': weight}}, _ctx(z))
    as_dict = lambda fs: dict(zip(kdsvd.STAGES, fs))

    @jax.jit
    def run(student):
      loss = lambda s: weight * sum(kdsvd.kdsvd_terms(s, teacher, k, form, reference))
      # The registered method computes the same sum, with the backend's teacher signs.
      terms, _ = d.apply({}, as_dict(student), as_dict(teacher), _batch(z), PROGRESS,
                         train=True)
      unreferenced = weight * sum(kdsvd.kdsvd_terms(student, teacher, k, form))
      return jax.value_and_grad(loss)(student), terms['kdsvd'], unreferenced

    (value, grads), module_value, unreferenced = run(feats('student'))
    assert rel_err(value, z['loss/kd']) < tol, (float(value), float(z['loss/kd']))
    for n, g in zip(kdsvd.STAGES, grads):
      assert rel_err(g, z[f'grad/student/{n}']) < grad_tol, n
    assert rel_err(module_value, unreferenced) < 1e-6


def _teacher_variables(spec, z):
  """The teacher model's variable tree (zeros) with the file's BatchNorms where mdistiller's
  get_bn_before_relu() takes them: the test's own reading of the models' layouts."""
  from kd_jax import models  # pylint: disable=g-import-not-at-top
  name = spec['pair']['teacher'] if isinstance(spec['pair'], dict) else spec['pair'][0]
  model = models.create_model(name, z['student/logits'].shape[1])
  shapes = jax.eval_shape(lambda: models.init_variables(model, jax.random.key(0)))
  params = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes['params'])
  for i in (1, 2, 3):
    bn = {'scale': z[f'teacher/bn_before_relu{i}/weight'],
          'bias': z[f'teacher/bn_before_relu{i}/bias']}
    if name.startswith('wrn'):  # the BN applied next: block<i+1>_0.bn1, then the final bn1
      params[f'block{i + 1}_0' if i < 3 else 'bn1'].update(
          {'bn1': bn} if i < 3 else bn)
    else:  # resnet: the last block's bn2, the last entry of the scanned stack
      for key, value in bn.items():
        params[f'layer{i}_blocks']['bn2'][key][-1] = value
  return {'params': params}


@pytest.mark.parametrize('name', _files('ofd'))
def test_ofd_matches_the_original(name):
  from kd_jax import torch_import  # pylint: disable=g-import-not-at-top
  from kd_jax.methods import ofd  # pylint: disable=g-import-not-at-top
  from tests import golden  # pylint: disable=g-import-not-at-top
  z, spec = _load(name)
  hyper = spec['hyper_parameters']
  d = distiller.build('ofd', {'ofd': {'weight': hyper['feat_weight'],
                                      'ce_weight': hyper['ce_weight'],
                                      'connector_kernel_size': hyper['connector_kernel_size']}},
                      _ctx(z))
  (_, module), = d.parts
  sd = golden.state_dict_values(spec['weights_seed'], spec['weights_spec'])
  key = lambda j, part: f'connectors.connectors.{j}.{part}'
  params = {**{f'connector{j}_conv': {'kernel': torch_import.to_flax_layout(sd[key(j, '0.weight')])}
               for j in range(3)},
            **{f'connector{j}_bn': {'scale': sd[key(j, '1.weight')], 'bias': sd[key(j, '1.bias')]}
               for j in range(3)}}
  stats = {f'connector{j}_bn': {'mean': sd[key(j, '1.running_mean')],
                                'var': sd[key(j, '1.running_var')]} for j in range(3)}
  batch = {**_batch(z), 'teacher_variables': _teacher_variables(spec, z)}
  names = [f'preact_stage{i}' for i in (1, 2, 3)]
  teacher = {n: jnp.asarray(z[f'teacher/{n}']) for n in names}

  @jax.jit
  def run(params, student):
    def loss(params, student):
      out, new = module.apply({'params': params, 'batch_stats': stats}, student, teacher, batch,
                              PROGRESS, train=True, mutable=['batch_stats'])
      return out['ofd'], new['batch_stats']
    got_margins = [ofd.margins(bn['scale'], bn['bias'])
                   for bn in ofd.teacher_bns(batch['teacher_variables']['params'], (1, 2, 3))]
    return jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, student), got_margins

  ((value, new_stats), (g_params, g_student)), got_margins = run(
      params, {n: jnp.asarray(z[f'student/{n}']) for n in names})
  for i, m in enumerate(got_margins, 1):
    assert rel_err(m, z[f'ofd/margin{i}']) < 1e-6
  assert rel_err(value, z['loss/kd']) < 1e-5, (float(value), float(z['loss/kd']))
  for n in names:
    assert rel_err(g_student[n], z[f'grad/student/{n}']) < 1e-5, n
  for j in range(3):
    pairs = [(key(j, '0.weight'), np.asarray(g_params[f'connector{j}_conv']['kernel'])
              .transpose(3, 2, 0, 1)),
             (key(j, '1.weight'), g_params[f'connector{j}_bn']['scale']),
             (key(j, '1.bias'), g_params[f'connector{j}_bn']['bias'])]
    for k, got, want in _weight_grads(z, dict(pairs)):
      assert rel_err(got, want) < 1e-5, k
    assert rel_err(new_stats[f'connector{j}_bn']['mean'],
                   z[f'state_after/{key(j, "1.running_mean")}']) < 1e-5
    assert rel_err(new_stats[f'connector{j}_bn']['var'],
                   z[f'state_after/{key(j, "1.running_var")}']) < 1e-5


@pytest.mark.parametrize('teacher', ['resnet32x4', 'wrn_40_2'])
def test_ofd_finds_the_teachers_batchnorms_before_relu(teacher):
  """Whatever pair the committed files hold, both layouts are read where mdistiller's
  get_bn_before_relu() reads them (resnet: the scanned stack's last bn2; wrn: the next BN)."""
  from kd_jax import models  # pylint: disable=g-import-not-at-top
  from kd_jax.methods import ofd  # pylint: disable=g-import-not-at-top
  model = models.create_model(teacher, 10)
  shapes = models.feature_shapes(model, 1)
  rng = np.random.default_rng(0)
  z = {'student/logits': np.zeros((1, 10))}
  for i in (1, 2, 3):
    c = shapes[f'preact_stage{i}'].shape[-1]
    z[f'teacher/bn_before_relu{i}/weight'] = rng.normal(size=c).astype(np.float32)
    z[f'teacher/bn_before_relu{i}/bias'] = rng.normal(size=c).astype(np.float32)
  variables = _teacher_variables({'pair': {'teacher': teacher}}, z)
  for i, bn in enumerate(ofd.teacher_bns(variables['params'], (1, 2, 3)), 1):
    np.testing.assert_array_equal(bn['scale'], z[f'teacher/bn_before_relu{i}/weight'])
    np.testing.assert_array_equal(bn['bias'], z[f'teacher/bn_before_relu{i}/bias'])


def test_kdsvd_trains_a_real_step():
  """The whole jitted train step (where differentiating jnp.linalg.svd hung XLA:CPU)."""
  from tests.conftest import tiny_config, train_one_step  # pylint: disable=g-import-not-at-top
  config = tiny_config('kdsvd')
  config.model = 'resnet8'
  state, metrics = train_one_step(config)
  assert np.isfinite(float(metrics['loss'])) and float(metrics['kd_kdsvd']) > 0
  assert int(state.step) == 1
