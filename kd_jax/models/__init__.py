"""The model zoo: families registered by name, one module each.

Every model maps images [N, H, W, 3] to `(logits, features)`. `features` holds, NHWC:
- 'stem': the stem's output (mdistiller's `feats[0]`);
- 'stage<i>', i = 1..S: stage i's output after its final ReLU (`feats[i]`);
- 'preact_stage<i>': the same before that ReLU (`preact_feats[i]`), where the family
  has one (FitNet, OFD and ReviewKD read these);
- 'pooled': the globally pooled feature the classifier reads ([N, C]).
`feature_shapes` gives their shapes without computing anything, so a method can size
its connectors.

A family module (FAMILIES below) defines `build(name, num_classes, **kwargs)`, which
returns its model for a name it owns and None otherwise (raising ValueError for a name
it owns with impossible numbers), `NAMES_HELP` (the names it accepts, for errors), and
`torch_module(path)` (the PyTorch module name of a Flax module path, see
kd_jax.torch_import) and `HEAD` (its top-level modules that RepDistiller's
`get_feat_modules()` leaves out: the classifier and what only feeds it). Adding a
family is one module and one line here.
"""
import functools
import importlib

import jax
import jax.numpy as jnp
from flax import traverse_util

from kd_jax.models.scan import SCANNED_COLLECTIONS, stack_blocks, to_layout_of, unstack_blocks

# Family modules (kd_jax/models/<name>.py), tried in this order.
FAMILIES = ('resnet', 'resnetv2', 'wrn', 'vgg', 'mobilenetv2', 'shufflenet')


def family(name: str):
  """The family module that owns model `name`."""
  for module_name in FAMILIES:
    module = importlib.import_module(f'kd_jax.models.{module_name}')
    if module.build(name, 1) is not None:
      return module
  helps = [importlib.import_module(f'kd_jax.models.{f}').NAMES_HELP for f in FAMILIES]
  raise ValueError(f'unknown model {name!r}; expected one of: ' + '; '.join(helps))


def create_model(name: str, num_classes: int, **kwargs):
  """Builds a model by name, e.g. 'resnet_32_20', 'resnet56', 'wrn_40_2'.

  kwargs go to the family's module (dtype, axis_name, bn_momentum, ...).
  """
  return family(name).build(name, num_classes, **kwargs)


def torch_module_name(model, path) -> str:
  """PyTorch module name of the Flax module `path` (unrolled layout) of `model`."""
  return importlib.import_module(type(model).__module__).torch_module(tuple(path))


def head_modules(model):
  """The names of `model`'s top-level modules after its feature layers (the family's
  HEAD): what an init stage of the student's features leaves alone."""
  return importlib.import_module(type(model).__module__).HEAD


def init_variables(model, rng, image_shape=(32, 32, 3)):
  """Initial {'params', 'batch_stats'} of `model` for images of `image_shape`."""
  dummy = jnp.zeros((1, *image_shape), jnp.float32)
  return jax.jit(functools.partial(model.init, train=False))(rng, dummy)


def variable_shapes(model, image_shape=(32, 32, 3)):
  """init_variables' structure as ShapeDtypeStructs, without computing anything."""
  return jax.eval_shape(lambda rng: init_variables(model, rng, image_shape), jax.random.key(0))


def feature_shapes(model, batch_size: int = 1, image_shape=(32, 32, 3)):
  """{'logits', feature name: ShapeDtypeStruct} of `model`, without computing anything."""
  def outputs(variables, images):
    logits, features = model.apply(variables, images, train=False)
    return {**features, 'logits': logits}
  images = jax.ShapeDtypeStruct((batch_size, *image_shape), jnp.float32)
  return jax.eval_shape(outputs, variable_shapes(model, image_shape), images)


def check_variables(variables, template, source: str, model_name: str = 'the model'):
  """Raises ValueError unless `variables` has the names and shapes of `template`."""
  got = traverse_util.flatten_dict({k: variables.get(k, {}) for k in ('params', 'batch_stats')})
  want = traverse_util.flatten_dict({k: template[k] for k in ('params', 'batch_stats')})
  missing = sorted('/'.join(k) for k in want.keys() - got.keys())
  unexpected = sorted('/'.join(k) for k in got.keys() - want.keys())
  if missing or unexpected:
    raise ValueError(f'{source} does not fit {model_name}: missing {missing[:4]}'
                     f'{" ..." if len(missing) > 4 else ""}, unexpected {unexpected[:4]}'
                     f'{" ..." if len(unexpected) > 4 else ""}')
  for k, v in want.items():
    if got[k].shape != v.shape:
      raise ValueError(f"{source} does not fit {model_name}: {'/'.join(k)} has shape "
                       f'{tuple(got[k].shape)}, the model expects {tuple(v.shape)}')
