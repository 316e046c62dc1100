"""Methods: the registry, settings, combining methods, the seed's losses and their options.
(Parity of the seed's losses with the reference: test_parity.py; of the field's methods
with their originals: test_methods_*.py.)"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax import methods
from kd_jax.methods import distiller, reference, st
from tests.conftest import tiny_config, train_one_step


def _outputs(key, num_classes=10, size=28):
  keys = jax.random.split(key, 6)
  shapes = {'stem': (4, size, size, 16), 'stage1': (4, size, size, 16),
            'stage2': (4, size // 2, size // 2, 32), 'stage3': (4, size // 4, size // 4, 64),
            'pooled': (4, 64), 'logits': (4, num_classes)}
  return {k: jax.nn.relu(jax.random.normal(kk, s)) if k != 'logits' else jax.random.normal(kk, s)
          for kk, (k, s) in zip(keys, shapes.items())}


def _shapes(outputs):
  return {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in outputs.items()}


def _terms(method, s, t, **overrides):
  """The terms of `method` ('a' or 'a+b') on outputs s, t; overrides[<method>] = fields."""
  ctx = methods.Context(student=_shapes(s), teacher=_shapes(t), num_classes=10,
                        train_size=100, steps_per_epoch=10)
  d = distiller.build(method, overrides, ctx)
  _, teacher, batch, progress = distiller.example_inputs(ctx, 4)
  variables = d.init(jax.random.key(0), s, t, batch, progress)
  return d, d.apply(variables, s, t, batch, progress, train=True)[0]


def test_registry_lists_methods_and_refuses_unknown_names():
  assert {'base', 'logit', 'st', 'at', 'fsp'} <= set(methods.names())
  assert not methods.get('base').needs_teacher
  with pytest.raises(ValueError, match="unknown method 'hint'; expected one of: .*base"):
    methods.get('hint')


def test_settings_take_defaults_and_refuse_bad_values():
  cfg = distiller.settings(methods.get('st'), {'temperature': 2.0})
  assert (cfg.temperature, cfg.weight, cfg.alpha) == (2.0, 1.0, None)
  with pytest.raises(ValueError, match=r"config.distill.st.temperature=0 is not accepted; "
                     r"expected a number > 0"):
    distiller.settings(methods.get('st'), {'temperature': 0})
  with pytest.raises(ValueError, match="config.distill.st.beta is not a field of method 'st'"):
    distiller.settings(methods.get('st'), {'beta': 1.0})
  with pytest.raises(AttributeError):
    cfg.temperature = 3.0


def test_a_method_defined_in_a_test_trains_a_real_step(tmp_path):
  """Adding a method is one Method and one register call: here one with a trainable
  scale and a counter, registered only inside this test, trained through train.py."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top

  class ScaledL1(nn.Module):
    cfg: object

    @nn.compact
    def __call__(self, student, teacher, batch, progress, train=True):
      scale = self.param('scale', nn.initializers.ones, ())
      calls = self.variable('method_state', 'calls', jnp.zeros, (), jnp.int32)
      if train and not self.is_initializing():
        calls.value += 1
      diff = jnp.abs(student['logits'] - teacher['logits'] * scale)
      return {'l1': self.cfg.weight * jnp.mean(diff)}

  toy = methods.Method(name='toy_l1', doc='L1 between logits, teacher scaled.',
                       build=lambda cfg, ctx: ScaledL1(cfg), ce_weight=0.5,
                       fields={'weight': methods.Field(2.0, 'weight of the L1 term')})
  methods.register(toy)
  try:
    config = tiny_config('toy_l1')
    state, metrics = train_one_step(config, tmp_path)
    assert float(metrics['kd_l1']) > 0
    assert float(state.method_state['toy_l1']['calls']) == 1
    assert float(state.params['method']['toy_l1']['scale']) != 1.0  # trained with the student
  finally:
    del methods.METHODS['toy_l1']


@pytest.mark.parametrize('method', ['logit', 'st', 'at', 'at+st', 'fsp'])
def test_identical_outputs_give_zero_kd(method):
  s = _outputs(jax.random.key(0))
  _, terms = _terms(method, s, s)
  assert terms and all(abs(float(v)) < 1e-6 for v in terms.values())
  _, terms = _terms(method, s, _outputs(jax.random.key(1)))
  assert all(float(v) > 0 for v in terms.values())


def test_combined_methods_add_their_terms_and_multiply_ce_weights():
  s, t = _outputs(jax.random.key(0)), _outputs(jax.random.key(1))
  d, both = _terms('at+st', s, t, st={'alpha': 0.9})
  _, at = _terms('at', s, t)
  _, st_only = _terms('st', s, t, st={'alpha': 0.9})
  assert set(both) == {'at', 'st'}
  np.testing.assert_allclose(both['at'], at['at'], rtol=1e-6)
  np.testing.assert_allclose(both['st'], st_only['st'], rtol=1e-6)
  assert d.ce_weight == pytest.approx(0.1)


def test_logit_regression_on_real_logits():
  s, t = _outputs(jax.random.key(0)), _outputs(jax.random.key(1))
  pooled = _terms('logit', s, t)[1]['logit']
  logits = _terms('logit', s, t, logit={'target': 'logits'})[1]['logit']
  np.testing.assert_allclose(pooled, np.mean((s['pooled'] - t['pooled'])**2), rtol=1e-6)
  np.testing.assert_allclose(logits, np.mean((s['logits'] - t['logits'])**2), rtol=1e-6)


def test_hinton_alpha_weighting():
  s, t = _outputs(jax.random.key(0)), _outputs(jax.random.key(1))
  d_plain, plain = _terms('st', s, t)
  d_alpha, weighted = _terms('st', s, t, st={'alpha': 0.9})
  np.testing.assert_allclose(weighted['st'], 0.9 * plain['st'], rtol=1e-6)
  assert d_alpha.ce_weight == pytest.approx(0.1) and d_plain.ce_weight == 1.0
  assert _terms('at', s, t)[0].ce_weight == 1.0


def test_soft_targets_against_a_direct_formula():
  s, t = _outputs(jax.random.key(0)), _outputs(jax.random.key(1))
  temperature = 3.0
  p_t = np.asarray(jax.nn.softmax(t['logits'] / temperature))
  p_s = np.asarray(jax.nn.softmax(s['logits'] / temperature))
  expected = temperature**2 * np.mean(np.sum(p_t * np.log(p_t / p_s), axis=1))
  np.testing.assert_allclose(st.soft_target_kl(s['logits'], t['logits'], temperature),
                             expected, rtol=1e-5)


def test_fsp_pools_the_larger_map():
  f_in = jnp.arange(2 * 4 * 4 * 1, dtype=jnp.float32).reshape(2, 4, 4, 1)
  f_out = jnp.ones((2, 2, 2, 3))
  g = reference.fsp_matrix(f_in, f_out)
  pooled = f_in.reshape(2, 2, 2, 2, 2, 1).mean(axis=(2, 4))
  np.testing.assert_allclose(g[:, 0, 0], pooled.reshape(2, -1).sum(1) / 4)
  assert g.shape == (2, 1, 3)


def test_bfloat16_features_give_float32_losses():
  s, t = _outputs(jax.random.key(0)), _outputs(jax.random.key(1))
  s16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), s)
  for method in ('logit', 'st', 'at', 'fsp'):
    (term,) = _terms(method, s16, t)[1].values()
    assert term.dtype == jnp.float32


def test_pairs_that_cannot_be_compared_are_refused_in_one_line():
  from kd_jax import models  # pylint: disable=g-import-not-at-top
  ref, he = models.create_model('resnet_32_8', 10), models.create_model('resnet8', 10)
  kw = dict(batch_size=2, num_classes=10, train_size=100, steps_per_epoch=10)
  distiller.for_models('st', {}, ref, he, **kw)  # logits compare
  with pytest.raises(ValueError, match="method 'at' cannot compare these outputs") as e:
    distiller.for_models('at', {}, ref, he, **kw)  # 28x28 vs 32x32 maps
  assert '\n' not in str(e.value)
