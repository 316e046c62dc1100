"""Two real training steps against mdistiller's own trainer (tests/data/steps, see its
README): the train step as kd_jax runs it (teacher in running-statistics mode, student
forward and backward, cross-entropy and the method's terms, SGD with momentum and
weight decay), in float64, from the same weights and batches."""
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax import methods, models, steps, torch_import
from kd_jax.methods import feature, reviewkd
from tests import golden
from tests.conftest import rel_err, step_kw

STEPS_DIR = os.environ.get('KD_STEP_VECTORS_DIR',
                           os.path.join(os.path.dirname(__file__), 'data', 'steps'))
# mdistiller's config keys -> kd_jax fields, per method.
FIELDS = {'dkd': {'ALPHA': 'alpha', 'BETA': 'beta', 'T': 'temperature', 'WARMUP': 'warmup',
                  'CE_WEIGHT': 'ce_weight'},
          'fitnet': {'HINT_LAYER': 'hint_layer', 'FEAT_WEIGHT': 'weight',
                     'CE_WEIGHT': 'ce_weight'},
          'crd': {'DIM': 'feat_dim', 'K': 'num_negatives', 'MOMENTUM': 'momentum',
                  'TEMPERATURE': 'temperature', 'FEAT_WEIGHT': 'weight', 'CE_WEIGHT': 'ce_weight'},
          'reviewkd': {'REVIEWKD_WEIGHT': 'weight', 'WARMUP_EPOCHS': 'warmup_epochs',
                       'MAX_MID_CHANNEL': 'max_mid_channel', 'CE_WEIGHT': 'ce_weight'}}


def _torch_tree(tree, key_of):
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    leaf = np.asarray(leaf)
    out[key_of(tuple(p.key for p in path))] = leaf.transpose(3, 2, 0, 1) if leaf.ndim == 4 else leaf
  return out


def _context(model, teacher_model):
  return methods.Context(student=models.feature_shapes(model, 2),
                         teacher=models.feature_shapes(teacher_model, 2), num_classes=100,
                         train_size=100, steps_per_epoch=STEPS_PER_EPOCH)
STEPS_PER_EPOCH = 100  # any count that keeps both steps in the file's epoch


@pytest.mark.parametrize('method', sorted(FIELDS))
def test_two_train_steps_match_mdistiller(method):
  with np.load(os.path.join(STEPS_DIR, f'step_{method}.npz')) as f:
    z = {k: f[k] for k in f.files}
  spec = json.loads(str(z['spec']))
  config = dict(spec['method_config'])
  for group in ('LOSS', 'NCE', 'FEAT'):  # e.g. FITNET.LOSS.FEAT_WEIGHT, CRD.NCE.K
    config.update(config.pop(group, {}))
  fields = {FIELDS[method][k]: v for k, v in config.items() if k in FIELDS[method]}
  with jax.enable_x64(True):
    as64 = lambda tree: jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), tree)
    num_classes = spec['pair']['num_classes']
    model = models.create_model(spec['pair']['student'], num_classes)
    teacher_model = models.create_model(spec['pair']['teacher'], num_classes)
    load = lambda role, m: as64(torch_import.torch_to_flax(
        golden.state_dict_values(spec['seeds'][role], spec['entries'][role]), m))
    teacher = steps.Teacher(teacher_model, load('teacher', teacher_model),
                            batch_stats_mode=False)  # mdistiller's teacher is in eval mode
    tx = steps.create_optimizer(lambda count: spec['lr'], spec['momentum'],
                                spec['weight_decay'])
    # The method's own modules (FitNet's conv_reg, ReviewKD's ABFs) from the file's seed.
    values = golden.state_dict_values(spec['seeds']['connectors'], spec['entries']['connectors'])
    if method == 'reviewkd':
      connectors = reviewkd.from_torch(values)
      connectors = {c: connectors[c] for c in ('params', 'batch_stats')}
      # The ABFs sized from the pair's shapes are the file's config.
      in_c, out_c, shapes, out_shapes, _ = reviewkd.layout(_context(model, teacher_model),
                                                           fields['max_mid_channel'])
      config = spec['method_config']
      assert (in_c, out_c, shapes, out_shapes) == (
          config['IN_CHANNELS'], config['OUT_CHANNELS'], config['SHAPES'], config['OUT_SHAPES'])
    else:
      connectors = feature.torch_connector_variables(values)
    method_variables = {c: {method: as64(tree)} for c, tree in connectors.items()}
    train_size = 100
    if method == 'crd':  # the memory banks and Z as the file starts them
      train_size = len(z['crd/memory_v1_before1'])
      method_variables['method_state'] = {'crd': {
          'memory_s': as64(z['crd/memory_v1_before1']),
          'memory_t': as64(z['crd/memory_v2_before1']),
          'z': as64(z['crd/params_before1'][2:4]),
          'labels': jnp.full((train_size,), -1, jnp.int32)}}
    state = steps.create_train_state(model, load('student', model), tx, 0, method_variables)
    # The file's 1-based epoch, as kd_jax derives it from the step.
    state = state.replace(step=(spec['epoch'] - 1) * STEPS_PER_EPOCH)
    step = jax.jit(functools.partial(
        steps.train_step, **step_kw(method, model, teacher_model, STEPS_PER_EPOCH,
                                    train_size=train_size, **{method: fields})))
    for i in (1, 2):
      batch = {'image': jnp.asarray(z[f'x{i}'], jnp.float64),
               'label': jnp.asarray(z[f'y{i}'], jnp.int32)}
      if method == 'crd':  # the dataset indices and the original's negatives
        batch.update(index=jnp.asarray(z[f'index{i}'], jnp.int32),
                     contrast_idx=jnp.asarray(z[f'crd/contrast_idx{i}'], jnp.int32))
      state, metrics = step(state, batch, teacher)
      ce_weight = fields.get('ce_weight', 1.0)
      assert rel_err(ce_weight * metrics['ce'], z[f'loss{i}/loss_ce']) < 1e-10
      assert rel_err(metrics[f'kd_{method}'], z[f'loss{i}/loss_kd']) < 1e-10
      got = torch_import.flax_to_torch(state.student_variables(), model)
      want = {k[len(f'student{i}/'):]: v for k, v in z.items() if k.startswith(f'student{i}/')}
      assert want
      for key, value in want.items():
        if not key.endswith('num_batches_tracked'):
          assert rel_err(got[key], value) < 1e-6, (i, key, rel_err(got[key], value))
      # The connectors' parameters (SGD with the student's weight decay) and BatchNorm
      # statistics.
      want = {k[len(f'connector{i}/'):]: v for k, v in z.items()
              if k.startswith(f'connector{i}/')}
      assert bool(want) == bool(spec['entries']['connectors'])
      if method == 'reviewkd':
        got = {**_torch_tree(state.params['method'][method], reviewkd.to_torch_key),
               **_torch_tree(state.batch_stats['method'][method], reviewkd.to_torch_key)}
        want = {k: v for k, v in want.items() if not k.endswith('num_batches_tracked')}
        assert set(got) == set(want)
        for key, value in want.items():
          assert rel_err(got[key], value) < 1e-6, (i, key, rel_err(got[key], value))
        want = {}
      for key, value in want.items():
        where = feature.flax_path(key, value.ndim)
        if where is not None:
          collection, path = where
          tree = (state.params if collection == 'params' else state.batch_stats)['method'][method]
          for part in path:
            tree = tree[part]
          got_key = torch_import.to_torch_layout(np.asarray(tree))
          assert rel_err(got_key, value) < 1e-6, (i, key, rel_err(got_key, value))
      if method == 'crd':
        crd_state = state.method_state['crd']
        assert rel_err(crd_state['memory_s'], z[f'crd/memory_v1_after{i}']) < 1e-6
        assert rel_err(crd_state['memory_t'], z[f'crd/memory_v2_after{i}']) < 1e-6
        assert rel_err(crd_state['z'], z[f'crd/params_after{i}'][2:4]) < 1e-10
