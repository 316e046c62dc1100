"""Distillation losses: the registry, the literature's options, shape checks.
(Parity of every loss with the reference: test_parity.py.)"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax import distill

KD = {'temperature': 4.0, 'st_weight': 1.0, 'at_beta': 1000.0, 'logit_target': 'pooled',
      'logit_weight': 1.0, 'fsp_weight': 1.0, 'alpha': None}


def _outputs(key, num_classes=10, size=28):
  keys = jax.random.split(key, 6)
  shapes = {'stem': (4, size, size, 16), 'stage1': (4, size, size, 16),
            'stage2': (4, size // 2, size // 2, 32), 'stage3': (4, size // 4, size // 4, 64),
            'pooled': (4, 64), 'logits': (4, num_classes)}
  return {k: jax.nn.relu(jax.random.normal(kk, s)) if k != 'logits' else jax.random.normal(kk, s)
          for kk, (k, s) in zip(keys, shapes.items())}


def test_registry_names_the_reference_methods():
  assert list(distill.METHODS) == ['base', 'logit', 'st', 'at', 'at_st', 'fsp']
  assert not distill.get_method('base').needs_teacher
  with pytest.raises(ValueError, match="unknown method 'hint'; expected one of: base, logit"):
    distill.get_method('hint')


def test_adding_a_method_is_one_function_and_one_entry():
  def l1_logits(student, teacher, labels, kd):
    del labels
    return {'l1': kd['l1_weight'] * jnp.mean(jnp.abs(student['logits'] - teacher['logits']))}

  distill.register('l1', l1_logits)
  try:
    s, t = _outputs(jax.random.key(0)), _outputs(jax.random.key(1))
    terms = distill.get_method('l1').loss(s, t, jnp.zeros(4, jnp.int32), {'l1_weight': 2.0})
    np.testing.assert_allclose(terms['l1'], 2 * np.mean(np.abs(s['logits'] - t['logits'])),
                               rtol=1e-6)
  finally:
    del distill.METHODS['l1']


@pytest.mark.parametrize('method', ['logit', 'st', 'at', 'at_st', 'fsp'])
def test_identical_outputs_give_zero_kd(method):
  s = _outputs(jax.random.key(0))
  terms = distill.get_method(method).loss(s, s, jnp.zeros(4, jnp.int32), KD)
  assert terms and all(abs(float(v)) < 1e-6 for v in terms.values())
  t = _outputs(jax.random.key(1))
  terms = distill.get_method(method).loss(s, t, jnp.zeros(4, jnp.int32), KD)
  assert all(float(v) > 0 for v in terms.values())


def test_logit_regression_on_real_logits():
  s, t = _outputs(jax.random.key(0)), _outputs(jax.random.key(1))
  y = jnp.zeros(4, jnp.int32)
  pooled = distill.logit_loss(s, t, y, KD)['logit']
  logits = distill.logit_loss(s, t, y, dict(KD, logit_target='logits'))['logit']
  np.testing.assert_allclose(pooled, np.mean((s['pooled'] - t['pooled'])**2), rtol=1e-6)
  np.testing.assert_allclose(logits, np.mean((s['logits'] - t['logits'])**2), rtol=1e-6)


def test_hinton_alpha_weighting():
  s, t = _outputs(jax.random.key(0)), _outputs(jax.random.key(1))
  y = jnp.zeros(4, jnp.int32)
  plain = distill.st_loss(s, t, y, KD)['st']
  weighted = distill.st_loss(s, t, y, dict(KD, alpha=0.9))['st']
  np.testing.assert_allclose(weighted, 0.9 * plain, rtol=1e-6)
  assert distill.ce_weight('st', dict(KD, alpha=0.9)) == pytest.approx(0.1)
  assert distill.ce_weight('at_st', dict(KD, alpha=0.9)) == pytest.approx(0.1)
  assert distill.ce_weight('at', dict(KD, alpha=0.9)) == 1.0
  assert distill.ce_weight('st', KD) == 1.0


def test_soft_targets_against_a_direct_formula():
  s, t = _outputs(jax.random.key(0)), _outputs(jax.random.key(1))
  temperature = 3.0
  p_t = np.asarray(jax.nn.softmax(t['logits'] / temperature))
  p_s = np.asarray(jax.nn.softmax(s['logits'] / temperature))
  expected = temperature**2 * np.mean(np.sum(p_t * np.log(p_t / p_s), axis=1))
  np.testing.assert_allclose(distill.soft_target_kl(s['logits'], t['logits'], temperature),
                             expected, rtol=1e-5)


def test_fsp_pools_the_larger_map():
  f_in = jnp.arange(2 * 4 * 4 * 1, dtype=jnp.float32).reshape(2, 4, 4, 1)
  f_out = jnp.ones((2, 2, 2, 3))
  g = distill.fsp_matrix(f_in, f_out)
  pooled = f_in.reshape(2, 2, 2, 2, 2, 1).mean(axis=(2, 4))
  np.testing.assert_allclose(g[:, 0, 0], pooled.reshape(2, -1).sum(1) / 4)
  assert g.shape == (2, 1, 3)


def test_bfloat16_features_give_float32_losses():
  s, t = _outputs(jax.random.key(0)), _outputs(jax.random.key(1))
  s16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), s)
  for method in ('logit', 'st', 'at', 'fsp'):
    (term,) = distill.get_method(method).loss(s16, t, jnp.zeros(4, jnp.int32), KD).values()
    assert term.dtype == jnp.float32


def test_check_compatible_refuses_what_cannot_be_compared():
  shapes = lambda **kw: jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype),
                                     _outputs(jax.random.key(0), **kw))
  ref, he = shapes(size=28), shapes(size=32)
  assert distill.check_compatible(distill.get_method('at'), ref, ref, KD) == ('at',)
  assert distill.check_compatible(distill.get_method('st'), ref, he, KD) == ('st',)
  with pytest.raises(ValueError, match="method 'at' cannot compare"):
    distill.check_compatible(distill.get_method('at'), ref, he, KD)
  with pytest.raises(ValueError, match="method 'st' cannot compare"):
    distill.check_compatible(distill.get_method('st'), ref, shapes(num_classes=100), KD)
