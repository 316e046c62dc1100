"""Logit methods against the originals' own code (tests/data/methods, see its README):
`kd` and `dkd` (mdistiller), each with logit standardisation (logit-standardization-KD),
and `dist` (DIST_KD), also with it.
Each file holds the student's and teacher's logits, labels, the original's loss terms and
the gradient of its distillation term with respect to the student's logits."""
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
FILES = sorted(os.path.basename(p) for p in glob.glob(os.path.join(VECTORS_DIR, '*.npz'))
               if os.path.basename(p).split('__')[0].split('_')[0] in ('kd', 'dkd', 'dist'))
# The originals compute in float32 too; these bounds are float32 rounding of a mean over
# the batch of sums over 100 classes.
RTOL = 1e-5


def _load(name):
  with np.load(os.path.join(VECTORS_DIR, name)) as f:
    z = {k: f[k] for k in f.files}
  return z, json.loads(str(z['spec']))


def _fields(method, hyper):
  """The method's fields as the file's spec records the original's settings."""
  stand = bool(hyper.get('logit_stand', False))
  if method == 'dist':
    return {'tau': hyper['tau'], 'beta': hyper['beta'], 'gamma': hyper['gamma'],
            'weight': hyper['kd_loss_weight'], 'ce_weight': hyper['ori_loss_weight'],
            'logit_stand': stand}
  if method == 'kd':
    fields = {'ce_weight': hyper['ce_weight'], 'logit_stand': stand}
    fields.update({'stand_temperature': hyper['temperature'], 'stand_weight': hyper['kd_weight']}
                  if stand else {'temperature': hyper['temperature'], 'weight': hyper['kd_weight']})
  else:
    fields = {'ce_weight': hyper['ce_weight'], 'logit_stand': stand, 'warmup': hyper['warmup']}
    fields.update({'stand_alpha': hyper['alpha'], 'stand_beta': hyper['beta'],
                   'stand_temperature': hyper['temperature']} if stand else
                  {'alpha': hyper['alpha'], 'beta': hyper['beta'],
                   'temperature': hyper['temperature']})
  return fields


@pytest.mark.parametrize('name', FILES)
def test_logit_method_matches_the_original(name):
  z, spec = _load(name)
  method = spec.get('base_method') or name.split('__')[0].split('_')[0]
  hyper = spec['hyper_parameters']
  shapes = {'logits': jax.ShapeDtypeStruct(z['student/logits'].shape, jnp.float32)}
  ctx = methods.Context(student=shapes, teacher=shapes, num_classes=shapes['logits'].shape[1],
                        train_size=100, steps_per_epoch=1)
  d = distiller.build(method, {method: _fields(method, hyper)}, ctx)
  labels = jnp.asarray(z['labels'], jnp.int32)
  batch = {'label': labels, 'index': jnp.zeros_like(labels), 'key': jax.random.key(0)}
  progress = {'epoch': jnp.int32(hyper.get('epoch', 1)), 'step': jnp.int32(0)}

  def term(student_logits):
    terms, _ = d.apply({}, {'logits': student_logits}, {'logits': jnp.asarray(z['teacher/logits'])},
                       batch, progress, train=True)
    (value,) = terms.values()
    return value

  value, grad = jax.jit(jax.value_and_grad(term))(jnp.asarray(z['student/logits']))
  assert rel_err(value, z['loss/kd']) < RTOL, (float(value), float(z['loss/kd']))
  assert rel_err(grad, z['grad/student/logits']) < RTOL
  ce = -np.mean(jax.nn.log_softmax(z['student/logits'].astype(np.float64))[
      np.arange(len(labels)), z['labels']])
  assert rel_err(d.ce_weight * ce, z['loss/ce']) < RTOL


def test_dkd_warmup_is_computed_in_the_step_from_the_epoch():
  """One compiled function for every epoch: the factor min(epoch / 20, 1) is traced."""
  rng = np.random.default_rng(0)
  s, t = (jnp.asarray(rng.normal(size=(4, 10)), jnp.float32) for _ in range(2))
  shapes = {'logits': jax.ShapeDtypeStruct(s.shape, jnp.float32)}
  ctx = methods.Context(student=shapes, teacher=shapes, num_classes=10, train_size=4,
                        steps_per_epoch=1)
  d = distiller.build('dkd', {}, ctx)
  batch = {'label': jnp.arange(4), 'index': jnp.arange(4), 'key': jax.random.key(0)}
  traces = []

  @jax.jit
  def at_epoch(epoch):
    traces.append(1)
    return d.apply({}, {'logits': s}, {'logits': t}, batch,
                   {'epoch': epoch, 'step': jnp.int32(0)}, train=True)[0]['dkd']

  one, ten, forty = (float(at_epoch(jnp.int32(e))) for e in (1, 10, 40))
  assert len(traces) == 1
  np.testing.assert_allclose(ten, 10 * one, rtol=1e-6)
  np.testing.assert_allclose(forty, 20 * one, rtol=1e-6)
