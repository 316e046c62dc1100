"""Tests of importing the reference's PyTorch `.pth` teachers (kd_jax.torch_import and
the `.pth` branch of kd_jax.teachers.load_teacher_variables).

The weights are the seed parity vectors (see tests/data/parity/README.md; the folder
named by KD_PARITY_DIR, defaulting to that copy). Tests that write or read `.pth`
files need torch and are skipped without it; the pure name/layout conversion and the
"torch is needed" error are tested always.
"""
import collections
import os
import pickle
import re
import sys

import jax
import numpy as np
import pytest

from configs import default
from kd_jax import input_pipeline, models, teachers, torch_import

PARITY_DIR = os.environ.get('KD_PARITY_DIR',
                            os.path.join(os.path.dirname(__file__), 'data', 'parity'))
MODEL_FILE = 'model_resnet_32_20_c100.npz'
OUTPUTS = ('logits', 'stem', 'stage1', 'stage2', 'stage3', 'pooled')
RTOL = 1e-4  # README: ~1e-6 measured for ResNet-20 in float32, 1e-4 safe


def _rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / np.linalg.norm(b)


@pytest.fixture(scope='module')
def parity():
  """(state_dict, x, eval outputs, depth, num_classes) of the ResNet-20/CIFAR-100 vectors."""
  with np.load(os.path.join(PARITY_DIR, MODEL_FILE)) as f:
    state = {k[len('state/'):]: f[k] for k in f.files if k.startswith('state/')}
    x = f['x']
    outputs = {k[len('eval/'):]: f[k] for k in f.files if k.startswith('eval/')}
    num_classes = int(f['nclass'])
  # Depth from the file itself: blocks per stage n, depth 6n + 2.
  blocks = {m[1] for k in state for m in [re.match(r'layer1\.(\d+)\.', k)] if m}
  assert blocks and set(outputs) == set(OUTPUTS), (sorted(blocks), sorted(outputs))
  return state, x, outputs, 6 * len(blocks) + 2, num_classes


@pytest.fixture(scope='module')
def model(parity):
  _, _, _, depth, num_classes = parity
  return models.create_model(f'resnet_32_{depth}', num_classes)


@pytest.fixture(scope='module')
def template(model):
  return models.variable_shapes(model)


def _template(name, num_classes):
  return models.variable_shapes(models.create_model(name, num_classes))


def _assert_matches_state(variables, state, template, model):
  """`variables` is exactly `state` (all but num_batches_tracked) in Flax layout."""
  flat = jax.tree_util.tree_leaves_with_path(variables)
  want = jax.tree_util.tree_leaves_with_path({k: template[k] for k in ('params', 'batch_stats')})
  assert [p for p, _ in flat] == [p for p, _ in want]
  for (path, got), (_, spec) in zip(flat, want):
    assert got.shape == spec.shape, path
  back = torch_import.flax_to_torch(variables, model)
  assert sorted(back) == sorted(state)  # num_batches_tracked too: exported as 0
  expected = {k: v for k, v in state.items() if not k.endswith('num_batches_tracked')}
  for k, v in expected.items():
    assert back[k].dtype == v.dtype, k
    np.testing.assert_array_equal(back[k], v, err_msg=k)


# ---------------------------------------------------------------- no torch needed


@pytest.mark.parametrize('scan_blocks', [True, False], ids=['scanned', 'unrolled'])
def test_round_trip(parity, scan_blocks, model):
  state, _, _, depth, num_classes = parity
  model = models.create_model(f'resnet_32_{depth}', num_classes, scan_blocks=scan_blocks)
  template = models.variable_shapes(model)
  assert any(k.endswith('num_batches_tracked') for k in state)  # really dropped
  variables = torch_import.torch_to_flax(state, model)
  assert set(variables) == {'params', 'batch_stats'}
  _assert_matches_state(variables, state, template, model)
  # The layouts, spelled out: conv OIHW -> HWIO, linear [out, in] -> [in, out],
  # BatchNorm weight/bias -> params scale/bias, running stats -> batch_stats.
  np.testing.assert_array_equal(variables['params']['conv1']['kernel'],
                                state['conv1.weight'].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(variables['params']['layer2_0']['downsample_conv']['kernel'],
                                state['layer2.0.downsample.0.weight'].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(variables['params']['fc']['kernel'], state['fc.weight'].T)
  np.testing.assert_array_equal(models.unstack_blocks(variables)['params']['layer3_1']['bn2']
                                ['scale'], state['layer3.1.bn2.weight'])
  if scan_blocks:  # block j >= 1 of a stage is index j - 1 of the scanned stage
    np.testing.assert_array_equal(variables['params']['layer3_blocks']['bn2']['scale'][0],
                                  state['layer3.1.bn2.weight'])
  np.testing.assert_array_equal(variables['batch_stats']['layer2_0']['downsample_bn']['var'],
                                state['layer2.0.downsample.1.running_var'])


def test_torch_to_flax_rejects_what_does_not_fit(parity):
  state, _, _, depth, num_classes = parity
  other_depth = 8 if depth != 8 else 14
  with pytest.raises(ValueError, match='does not fit'):
    torch_import.torch_to_flax(state, models.create_model(f'resnet_32_{other_depth}', num_classes))
  with pytest.raises(ValueError, match='does not fit'):
    torch_import.torch_to_flax({k: v for k, v in state.items() if k != 'fc.bias'},
                               models.create_model(f'resnet_32_{depth}', num_classes))
  with pytest.raises(ValueError, match="unexpected key 'conv1.bias'"):
    torch_import.torch_to_flax({**state, 'conv1.bias': np.zeros(16, np.float32)},
                               models.create_model(f'resnet_32_{depth}', num_classes))


def test_load_pth_without_torch_says_torch_is_needed(monkeypatch, tmp_path, parity, template, model):
  monkeypatch.setitem(sys.modules, 'torch', None)  # `import torch` raises ImportError
  path = str(tmp_path / 'teacher.pth')
  with open(path, 'wb') as f:
    f.write(b'not read')
  with pytest.raises(ValueError) as e:
    torch_import.load_pth(path, model)
  message = str(e.value)
  assert '\n' not in message and 'torch' in message and repr(path) in message, message
  assert 'pip install torch' in message, message
  # The same through the teacher loader.
  config = default.get_config(method='st', dataset='cifar100')
  config.teacher.checkpoint = path
  with pytest.raises(ValueError, match='needs torch'):
    teachers.load_teacher_variables(config, template, input_pipeline.get_dataset_info('cifar100'),
                                    str(tmp_path / 'default_run'), _no_training)


def _no_training(config):
  raise AssertionError(f'train_teacher called for {config.model}')


def test_teacher_missing_pth_is_a_value_error(tmp_path, template):
  config = default.get_config(method='st', dataset='cifar100')
  path = str(tmp_path / 'nowhere' / 'teacher.pth')
  config.teacher.checkpoint = path
  with pytest.raises(ValueError, match='does not exist') as e:
    teachers.load_teacher_variables(config, template, input_pipeline.get_dataset_info('cifar100'),
                                    str(tmp_path / 'default_run'), _no_training)
  assert repr(path) in str(e.value)


# ---------------------------------------------------------------- with torch


@pytest.fixture
def torch():
  return pytest.importorskip('torch')


def _save_reference(torch, state, path, wrap=True):
  """As the reference saves its checkpoints: torch.save({'weight': state_dict}).

  wrap='module_state_dict' saves what nn.Module.state_dict() gives (an OrderedDict
  with `_metadata`) next to another entry, as a training script may.
  """
  state_dict = {k: torch.from_numpy(np.array(v)) for k, v in state.items()}
  if wrap == 'model_wrapper':  # RepDistiller's and mdistiller's train_teacher.py, DataParallel
    torch.save({'model': {f'module.{k}': v for k, v in state_dict.items()}, 'epoch': 240,
                'best_acc': 0.0}, path)
  elif wrap == 'module_state_dict':
    state_dict = collections.OrderedDict(state_dict)
    state_dict._metadata = {'': {'version': 1}}  # pylint: disable=protected-access
    torch.save({'weight': state_dict, 'epoch': 199}, path)
  else:
    torch.save({'weight': state_dict} if wrap else state_dict, path)
  return str(path)


@pytest.fixture(scope='module')
def apply_eval(parity):
  _, _, _, depth, num_classes = parity
  model = models.create_model(f'resnet_32_{depth}', num_classes)
  return jax.jit(lambda v, x: model.apply(v, x, train=False))


@pytest.mark.parametrize('wrap', [True, False, 'module_state_dict', 'model_wrapper'],
                         ids=['weight_wrapper', 'bare_state_dict', 'module_state_dict',
                              'model_wrapper'])
def test_load_pth_matches_reference_outputs(torch, tmp_path, parity, template, apply_eval, wrap, model):
  state, x, outputs, _, _ = parity
  path = _save_reference(torch, state, tmp_path / 'teacher.pth', wrap)
  variables = torch_import.load_pth(path, model)
  _assert_matches_state(variables, state, template, model)
  logits, features = apply_eval(variables, x)
  got = {'logits': logits, **features}
  assert set(OUTPUTS) <= set(got)
  for name in OUTPUTS:
    assert got[name].shape == outputs[name].shape, name
    err = _rel_err(got[name], outputs[name])
    assert err < RTOL, f'{name}: relative error {err:.2e}'


def test_load_pth_corrupt_file(torch, tmp_path, template, model):
  path = str(tmp_path / 'corrupt.pth')
  with open(path, 'wb') as f:
    f.write(np.random.default_rng(0).bytes(4096))
  with pytest.raises(ValueError) as e:
    torch_import.load_pth(path, model)
  assert repr(path) in str(e.value) and '\n' not in str(e.value), str(e.value)
  assert 'weights_only' not in str(e.value)  # never advise loading it unsafely


def test_load_pth_empty_file(torch, tmp_path, template, model):
  path = str(tmp_path / 'empty.pth')
  open(path, 'wb').close()
  with pytest.raises(ValueError, match=re.escape(repr(path))):
    torch_import.load_pth(path, model)


@pytest.mark.parametrize('content', [
    {'foo': 1},
    {'weight': 1},
    {'weight': {'conv1.weight': 1.0}},
    [1, 2, 3],
    'a string',
], ids=['dict_of_int', 'weight_int', 'weight_dict_of_float', 'list', 'str'])
def test_load_pth_not_a_state_dict(torch, tmp_path, template, content, model):
  path = str(tmp_path / 'other.pth')
  torch.save(content, path)
  with pytest.raises(ValueError, match='holds no state_dict') as e:
    torch_import.load_pth(path, model)
  assert repr(path) in str(e.value)


def test_load_pth_malformed_entries(torch, tmp_path, parity, template, model):
  state, _, _, _, _ = parity
  for bad, message in [({**state, 'conv1.weight': np.zeros(16, np.float32)},
                        r"'conv1.weight' has shape \(16,\), expected \(16, 3, 7, 7\)"),
                       ({**state, 3: np.zeros(1, np.float32)}, 'non-string key 3')]:
    path = str(tmp_path / 'bad.pth')
    torch.save({'weight': {k: torch.from_numpy(np.array(v)) for k, v in bad.items()}}, path)
    with pytest.raises(ValueError, match=message) as e:
      torch_import.load_pth(path, model)
    assert repr(path) in str(e.value)


@pytest.mark.parametrize('dtype', ['bfloat16', 'float16', 'float64'])
def test_teacher_in_other_precisions_is_read_as_float32(torch, tmp_path, parity, template, dtype):
  state, _, _, depth, _ = parity
  path = str(tmp_path / 'teacher.pth')
  torch.save({'weight': {k: torch.from_numpy(np.array(v)).to(getattr(torch, dtype))
                         if v.dtype.kind == 'f' else torch.from_numpy(np.array(v))
                         for k, v in state.items()}}, path)
  config = default.get_config(method='st', dataset='cifar100')
  config.teacher.model = f'resnet_32_{depth}'
  config.teacher.checkpoint = path
  variables = teachers.load_teacher_variables(
      config, template, input_pipeline.get_dataset_info('cifar100'), default_run_dir='/unused',
      train_teacher=None)
  assert all(a.dtype == np.float32 for a in jax.tree.leaves(variables))
  np.testing.assert_allclose(variables['params']['fc']['kernel'], state['fc.weight'].T,
                             rtol=1e-2 if dtype != 'float64' else 0, atol=1e-2)


def test_load_pth_wrong_architecture(torch, tmp_path, parity):
  state, _, _, depth, num_classes = parity
  path = _save_reference(torch, state, tmp_path / 'teacher.pth')
  other_depths = [d for d in (8, 110) if d != depth]
  other_classes = 10 if num_classes != 10 else 100
  wrong = [(f'resnet_32_{d}', num_classes) for d in other_depths]
  wrong += [(f'resnet_32_{depth}', other_classes),  # fc shapes differ
            (f'resnet{depth}', num_classes),  # mdistiller's: 3x3 stem
            (f'resnet{depth}_a', num_classes)]  # He et al.'s 3x3 stem, no projection
  for name, classes in wrong:
    with pytest.raises(ValueError, match='does not fit') as e:
      torch_import.load_pth(path, models.create_model(name, classes))
    assert '\n' not in str(e.value), (name, classes)


def test_teacher_loader_imports_pth(torch, tmp_path, parity, template, model):
  state, _, _, depth, num_classes = parity
  assert num_classes == input_pipeline.get_dataset_info('cifar100').num_classes
  path = _save_reference(torch, state, tmp_path / 'teacher.pth')
  config = default.get_config(method='st', dataset='cifar100')
  config.teacher.model = f'resnet_32_{depth}'
  config.teacher.checkpoint = path
  variables = teachers.load_teacher_variables(
      config, template, input_pipeline.get_dataset_info('cifar100'),
      str(tmp_path / 'default_run'), _no_training)
  _assert_matches_state(variables, state, template, model)
  assert not os.path.exists(tmp_path / 'default_run')
  # A wrong-architecture template is refused through the loader too.
  with pytest.raises(ValueError, match='does not fit'):
    teachers.load_teacher_variables(
        config, _template(f'resnet_32_{depth}', 10), input_pipeline.get_dataset_info('cifar10'),
        str(tmp_path / 'default_run'), _no_training)


# ---------------------------------------------------------------- security


def _make_marker(path):
  """What a malicious pickle would run on load: here, create a file."""
  with open(path, 'w') as f:
    f.write('pwned')
  return path


class _Payload:
  """Unpickling an instance calls _make_marker(path)."""

  def __init__(self, path):
    self.path = str(path)

  def __reduce__(self):
    return _make_marker, (self.path,)


def test_payload_is_live(tmp_path):
  """The payload really runs when unpickled unsafely, so the tests below can fail."""
  marker = tmp_path / 'marker'
  pickle.loads(pickle.dumps({'weight': {'x': _Payload(marker)}}))
  assert marker.exists()


@pytest.mark.parametrize('how', ['torch_save', 'pickle_dump'])
def test_load_pth_refuses_code(torch, tmp_path, template, how, model):
  marker = tmp_path / 'marker'
  path = str(tmp_path / 'evil.pth')
  if how == 'torch_save':  # a reference-style file with one object that is no tensor
    torch.save({'weight': {'x': _Payload(marker), 'conv1.weight': torch.zeros(1)}}, path)
  else:  # a plain pickle
    with open(path, 'wb') as f:
      pickle.dump({'weight': {'x': _Payload(marker)}}, f, protocol=2)
  with pytest.raises(ValueError, match=re.escape(repr(path))):
    torch_import.load_pth(path, model)
  assert not marker.exists(), 'load_pth executed code from the pickle'
  # The file is live: an unsafe load would have run the payload.
  try:
    torch.load(path, weights_only=False)
  except Exception:  # pylint: disable=broad-except  # a plain pickle has no magic number
    pass
  assert marker.exists()


def test_load_pth_asks_for_weights_only(torch, tmp_path, parity, template, monkeypatch, model):
  """weights_only=True explicitly: torch's default depends on its version and on
  TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD, an explicit True holds whatever they say."""
  state, _, _, _, _ = parity
  path = _save_reference(torch, state, tmp_path / 'teacher.pth')
  calls = []
  real_load = torch.load

  def spy(*args, **kwargs):
    calls.append(kwargs)
    return real_load(*args, **kwargs)

  monkeypatch.setattr(torch, 'load', spy)
  monkeypatch.setenv('TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD', '1')
  torch_import.load_pth(path, model)
  assert len(calls) == 1 and calls[0].get('weights_only') is True, calls
