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
from tests import golden
from tests.conftest import rel_err, step_kw

STEPS_DIR = os.environ.get('KD_STEP_VECTORS_DIR',
                           os.path.join(os.path.dirname(__file__), 'data', 'steps'))
# mdistiller's config keys -> kd_jax fields, per method.
FIELDS = {'dkd': {'ALPHA': 'alpha', 'BETA': 'beta', 'T': 'temperature', 'WARMUP': 'warmup',
                  'CE_WEIGHT': 'ce_weight'},
          'reviewkd': {'REVIEWKD_WEIGHT': 'weight', 'WARMUP_EPOCHS': 'warmup_epochs',
                       'MAX_MID_CHANNEL': 'max_mid_channel', 'CE_WEIGHT': 'ce_weight'}}


def _connectors(method, spec):
  """(method variables from the file's connector entries, torch key of a variable path)."""
  if method != 'reviewkd':
    return None, None
  from kd_jax.methods import reviewkd  # pylint: disable=g-import-not-at-top
  values = golden.state_dict_values(spec['seeds']['connectors'], spec['entries']['connectors'])
  variables = reviewkd.from_torch(values)
  return ({c: {method: variables[c]} for c in ('params', 'batch_stats')},
          reviewkd.to_torch_key)


def _torch_tree(tree, key_of):
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    leaf = np.asarray(leaf)
    out[key_of(tuple(p.key for p in path))] = leaf.transpose(3, 2, 0, 1) if leaf.ndim == 4 else leaf
  return out
STEPS_PER_EPOCH = 100  # any count that keeps both steps in the file's epoch


@pytest.mark.parametrize('method', sorted(FIELDS))
def test_two_train_steps_match_mdistiller(method):
  with np.load(os.path.join(STEPS_DIR, f'step_{method}.npz')) as f:
    z = {k: f[k] for k in f.files}
  spec = json.loads(str(z['spec']))
  fields = {FIELDS[method][k]: v for k, v in spec['method_config'].items()
            if k in FIELDS[method]}
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
    method_variables, key_of = _connectors(method, spec)
    if method_variables is not None:
      method_variables = as64(method_variables)
      if method == 'reviewkd':  # the ABFs sized from the pair's shapes are the file's config
        from kd_jax.methods import reviewkd  # pylint: disable=g-import-not-at-top
        in_c, out_c, shapes, out_shapes, _ = reviewkd.layout(_context(model, teacher_model),
                                                             fields['max_mid_channel'])
        config = spec['method_config']
        assert (in_c, out_c, shapes, out_shapes) == (
            config['IN_CHANNELS'], config['OUT_CHANNELS'], config['SHAPES'], config['OUT_SHAPES'])
    state = steps.create_train_state(model, load('student', model), tx, 0, method_variables)
    # The file's 1-based epoch, as kd_jax derives it from the step.
    state = state.replace(step=(spec['epoch'] - 1) * STEPS_PER_EPOCH)
    step = jax.jit(functools.partial(
        steps.train_step, **step_kw(method, model, teacher_model, STEPS_PER_EPOCH,
                                    **{method: fields})))
    for i in (1, 2):
      batch = {'image': jnp.asarray(z[f'x{i}'], jnp.float64),
               'label': jnp.asarray(z[f'y{i}'], jnp.int32)}
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
      if key_of is not None:  # the connectors' parameters and BatchNorm statistics
        got = {**_torch_tree(state.params['method'][method], key_of),
               **_torch_tree(state.batch_stats['method'][method], key_of)}
        want = {k[len(f'connector{i}/'):]: v for k, v in z.items()
                if k.startswith(f'connector{i}/') and not k.endswith('num_batches_tracked')}
        assert want and set(got) == set(want)
        for key, value in want.items():
          assert rel_err(got[key], value) < 1e-6, (i, key, rel_err(got[key], value))


def _context(model, teacher_model):
  return methods.Context(student=models.feature_shapes(model, 2),
                         teacher=models.feature_shapes(teacher_model, 2), num_classes=100,
                         train_size=100, steps_per_epoch=STEPS_PER_EPOCH)
