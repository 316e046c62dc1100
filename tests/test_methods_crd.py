"""CRD against mdistiller's CRD.py (tests/data/methods crd__*.npz, see its README): the
embeddings, the NCE loss with the file's negatives, Z fixed on the first call, the
gradients with respect to the student's pooled feature and both embeddings' weights,
both memory banks after the update, and a second call (new indices, the memory the first
left, the first call's Z). Then the sampler's own properties."""
import glob
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax import methods
from kd_jax.methods import crd, distiller, feature
from tests import golden
from tests.conftest import rel_err

VECTORS_DIR = os.environ.get('KD_METHOD_VECTORS_DIR',
                             os.path.join(os.path.dirname(__file__), 'data', 'methods'))
FILES = sorted(os.path.basename(p) for p in glob.glob(os.path.join(VECTORS_DIR, 'crd__*.npz')))
RTOL = 1e-5


def test_there_are_crd_vectors():
  assert FILES


@pytest.mark.parametrize('name', FILES)
def test_crd_matches_mdistiller(name):
  with np.load(os.path.join(VECTORS_DIR, name)) as f:
    z = {k: f[k] for k in f.files}
  spec = json.loads(str(z['spec']))
  hyper = spec['hyper_parameters']
  n = hyper['n_data']
  shapes = {'pooled': jax.ShapeDtypeStruct(z['student/pooled'].shape, jnp.float32)}
  t_shapes = {'pooled': jax.ShapeDtypeStruct(z['teacher/pooled'].shape, jnp.float32)}
  ctx = methods.Context(student=shapes, teacher=t_shapes, num_classes=100, train_size=n,
                        steps_per_epoch=1)
  fields = {'feat_dim': hyper['feat_dim'], 'num_negatives': hyper['nce_k'],
            'temperature': hyper['nce_t'], 'momentum': hyper['momentum'],
            'weight': hyper['feat_weight'], 'ce_weight': hyper['ce_weight']}
  d = distiller.build('crd', {'crd': fields}, ctx)
  assert d.ce_weight == hyper['ce_weight']
  weights = golden.state_dict_values(spec['weights_seed'], spec['weights_spec'])
  params = feature.torch_connector_variables(weights)['params']
  state = {'memory_s': jnp.asarray(z['crd/memory_s_before']),
           'memory_t': jnp.asarray(z['crd/memory_t_before']),
           'z': jnp.full((2,), -1.0, jnp.float32), 'labels': jnp.full((n,), -1, jnp.int32)}
  labels = jnp.asarray(z['labels'], jnp.int32)
  teacher = {'pooled': jnp.asarray(z['teacher/pooled'])}

  def call(params, pooled, state, prefix):
    batch = {'label': labels, 'index': jnp.asarray(z[f'{prefix}index'], jnp.int32),
             'key': jax.random.key(0),
             'contrast_idx': jnp.asarray(z[f'{prefix}contrast_idx'], jnp.int32)}
    terms, updates = d.apply({'params': {'crd': params}, 'batch_stats': {},
                              'method_state': {'crd': state}},
                             {'pooled': pooled}, teacher, batch,
                             {'epoch': jnp.int32(1), 'step': jnp.int32(0)}, train=True)
    return terms['crd'], updates['method_state']['crd']

  with jax.default_matmul_precision('highest'):
    (loss, new_state), (g_params, g_pooled) = jax.jit(jax.value_and_grad(
        lambda p, x: call(p, x, state, 'crd/'), argnums=(0, 1), has_aux=True))(
            params, jnp.asarray(z['student/pooled']))
    assert rel_err(loss, z['loss/kd']) < RTOL
    assert rel_err(g_pooled, z['grad/student/pooled']) < RTOL
    for key in ('embed_s.linear.weight', 'embed_s.linear.bias', 'embed_t.linear.weight',
                'embed_t.linear.bias'):
      module, _, leaf = key.rpartition('.')
      tree = g_params[module.split('.')[0]]['linear']
      value = tree['kernel'].T if leaf == 'weight' else tree['bias']
      want = z.get(f'grad/weights/{key}')
      if want is None:  # large gradients are stored as their first rows
        want = z[f'grad/weights_slice/{key}']
        value = value[:len(want)]
      assert rel_err(value, want) < RTOL, key
    np.testing.assert_allclose(new_state['z'], [z['crd/Z_s'], z['crd/Z_t']], rtol=RTOL)
    for side in ('s', 't'):
      assert rel_err(new_state[f'memory_{side}'], z[f'crd/memory_{side}_after']) < RTOL
    labels_seen = np.asarray(new_state['labels'])[z['crd/index']]
    np.testing.assert_array_equal(labels_seen, z['labels'])
    # The second call: new indices, the memory and Z of the first.
    loss2, state2 = jax.jit(lambda: call(params, jnp.asarray(z['student/pooled']), new_state,
                                         'crd/step2/'))()
    assert rel_err(loss2, z['loss/kd_step2']) < RTOL
    for side in ('s', 't'):
      assert rel_err(state2[f'memory_{side}'], z[f'crd/step2/memory_{side}_after']) < RTOL
    np.testing.assert_array_equal(state2['z'], new_state['z'])


def test_negatives_avoid_the_anchor_class_and_ignore_the_device_count():
  n, k = 1000, 64
  table = jnp.asarray(np.arange(n) % 10, jnp.int32)  # 10 classes
  index = jnp.arange(0, 40, dtype=jnp.int32)
  labels = table[index]
  key = jax.random.key(5)
  idx = crd.sample_contrast_idx(key, index, labels, table, k, n, redraws=3)
  assert idx.shape == (40, k + 1)
  np.testing.assert_array_equal(idx[:, 0], index)
  same = np.mean(np.asarray(table[idx[:, 1:]] == labels[:, None]))
  assert same < 1e-3  # 0.1^4 expected
  # A device holding half the batch draws the same negatives for its examples.
  half = crd.sample_contrast_idx(key, index[20:], labels[20:], table, k, n, redraws=3)
  np.testing.assert_array_equal(half, idx[20:])
  # Without redraws, about a tenth are of the anchor's class.
  plain = crd.sample_contrast_idx(key, index, labels, table, k, n, redraws=0)
  assert 0.05 < np.mean(np.asarray(table[plain[:, 1:]] == labels[:, None])) < 0.15
