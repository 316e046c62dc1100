"""Distillation methods: one registered object per method, one module per method.

A `Method` holds everything kd_jax knows about a method: its config fields with their
defaults and documentation (`config.distill.<method>.<field>`), its cross-entropy
weight, whether it needs a teacher, the teacher's BatchNorm mode the originals run it
in, and `build(cfg, ctx)`, which returns the Flax module that computes its loss terms.

That module (mdistiller's `Distiller`, minus the models) is called inside the jitted
train step as

    terms = module(student, teacher, batch, progress, train=True)

- `student`, `teacher`: the models' outputs, {'logits', 'stem', 'stage<i>',
  'preact_stage<i>', 'pooled'} (see kd_jax.models); `teacher` is None when
  `needs_teacher` is False.
- `batch`: {'label': [B] int32, 'index': [B] int32 (the examples' positions in the
  training split), 'key': a PRNG key for this step (the same on every device),
  'axis_name': the pmap axis of the data-parallel devices or None (gather over it what
  must be global, e.g. CRD's memory update), 'teacher_variables': the frozen teacher's
  Flax variables or None}. At init and in tests only the arrays may be present: use
  `batch.get(...)` for the last two. At init only, 'train_labels' ([train_size] int32,
  by dataset index) when the feed holds the split (the device feed does).
- `progress`: {'epoch': int32, 1-based as mdistiller counts, 'step': int32}.
- returns {term name: float32 scalar}, already weighted; the step adds them to the
  weighted cross-entropy.

The module's own variables: 'params' (trainable connectors, optimised with the student
by the same SGD and weight decay, checkpointed, never exported), 'batch_stats' (its
BatchNorms) and 'method_state' (non-gradient state such as memory banks, updated in
the step). `ctx` gives the shapes of both models' outputs, so a module sizes its layers
without running the models.

An init stage (RepDistiller's, before the main training, for AB, FT and FSP): a method
whose `Method.init_stage` says what that stage trains has a module method
`init_terms(student, teacher, batch, progress, train)` returning the stage's terms
(their plain sum is minimised) and the fields of `init_stage_fields()`; with
`init_epochs` > 0 the training loop runs that stage first (kd_jax.train). What it
trains (INIT_STAGE_TRAINS):
- 'student_features+method_params': the student's parameters but its head
  (`models.head_modules`: what RepDistiller's `get_feat_modules()` leaves out) and the
  module's 'params'; the student runs in train mode and its feature layers' BatchNorm
  statistics update;
- 'method_state:<name>': only the module's method_state[<name>] (FT's paraphraser); the
  student is not run (`student` is None).

Adding a method: one module under kd_jax/methods/ that calls `register(Method(...))`,
and its name in MODULES.
"""
import dataclasses
import importlib
from typing import Any, Callable, Mapping, Optional, Union

import flax.linen as nn
import jax

# Modules (kd_jax/methods/<name>.py) whose import registers methods.
MODULES = ('base', 'logit', 'st', 'reference', 'kd', 'dkd', 'at', 'fitnet', 'sp', 'nst', 'pkt',
           'rkd', 'cc', 'vid', 'dist', 'crd', 'reviewkd', 'ab', 'ft', 'fsp', 'kdsvd',
           'ofd')

METHODS = {}


@dataclasses.dataclass(frozen=True)
class Field:
  """A config field of a method: `config.distill.<method>.<name>`."""
  default: Any
  doc: str
  check: Optional[Callable[[Any], bool]] = None  # True when the value is acceptable
  accepted: str = ''  # what `check` accepts, for the error message


@dataclasses.dataclass(frozen=True)
class Context:
  """What a method may size its modules from, known before anything runs."""
  student: Mapping[str, jax.ShapeDtypeStruct]  # the student's outputs, batch dim first
  teacher: Optional[Mapping[str, jax.ShapeDtypeStruct]]
  num_classes: int
  train_size: int  # examples in the training split (CRD's memory size)
  steps_per_epoch: int


@dataclasses.dataclass(frozen=True)
class Method:
  name: str
  doc: str
  build: Callable[[Any, Context], nn.Module]  # (cfg: the method's ConfigDict, ctx) -> module
  fields: Mapping[str, Field] = dataclasses.field(default_factory=dict)
  ce_weight: Union[float, Callable[[Any], float]] = 1.0  # a number or a function of cfg
  needs_teacher: bool = True
  teacher_bn_mode: str = 'running'  # 'running' or 'batch' statistics for the teacher
  needs_labels: bool = False
  init_stage: Optional[str] = None  # what its init stage trains (see above), or None


# What an init stage may train; 'method_state:<name>' names the variable's subtree.
INIT_STAGE_TRAINS = ('student_features+method_params', 'method_state:')


def _init_epochs_ok(x) -> bool:
  return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def init_stage_fields(original_epochs: int) -> Mapping[str, Field]:
  """The fields of a method with an init stage (its Method.init_stage)."""
  return {
      'init_epochs': Field(0, 'epochs of the init stage on `init_terms` before the main '
                           f'training (RepDistiller: {original_epochs}; 0: one stage, '
                           'the method trained jointly with CE as mdistiller does)',
                           _init_epochs_ok, 'an integer >= 0'),
      'init_learning_rate': Field(None, "the init stage's constant lr (None: the run's "
                                  'learning_rate)', lambda x: x is None or positive(x),
                                  'None or a number > 0'),
  }


class PureLoss(nn.Module):
  """A method without variables: `fn(cfg, student, teacher, batch, progress)` -> terms."""
  fn: Callable
  cfg: Any

  def __call__(self, student, teacher, batch, progress, train: bool = True):
    del train
    return self.fn(self.cfg, student, teacher, batch, progress)


def pure(fn: Callable) -> Callable[[Any, Context], nn.Module]:
  """A Method's `build` for a loss that is a pure function of the models' outputs."""
  return lambda cfg, ctx: PureLoss(fn, cfg)


def positive(x) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0


def non_negative(x) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool) and x >= 0


def register(method: Method) -> Method:
  if method.name in METHODS:
    raise ValueError(f'method {method.name!r} is registered twice')
  if method.init_stage is not None and (
      not method.init_stage.startswith(INIT_STAGE_TRAINS) or 'init_epochs' not in method.fields):
    raise ValueError(f'method {method.name!r}: init_stage {method.init_stage!r} needs one of '
                     f'{INIT_STAGE_TRAINS} and the fields of init_stage_fields()')
  METHODS[method.name] = method
  return method


def _load():
  for name in MODULES:
    importlib.import_module(f'kd_jax.methods.{name}')


def get(name: str) -> Method:
  """The method called `name`."""
  _load()
  if name not in METHODS:
    raise ValueError(f"unknown method {name!r}; expected one of: {', '.join(sorted(METHODS))}")
  return METHODS[name]


def names():
  _load()
  return tuple(sorted(METHODS))
