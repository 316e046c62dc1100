"""The methods of a run put together: their settings, modules, variables and terms.

A run's `config.method` names one method or several joined by '+' (e.g. 'at+st',
'kd+crd'); their terms add up. Each method's module keeps its variables under its own
name in every collection ({'params': {'crd': ...}, 'method_state': {'crd': ...}}).
No ml_collections here: the train step runs where only jax and flax are installed.
"""
import dataclasses
from typing import Any, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp

from kd_jax import methods

COLLECTIONS = ('params', 'batch_stats', 'method_state')
# Collections a module may update in a train step.
MUTABLE = ('batch_stats', 'method_state')


class Settings:
  """A method's fields as read-only attributes (hashable, so modules may hold it)."""

  def __init__(self, values: Mapping[str, Any]):
    object.__setattr__(self, '_items', tuple(sorted(values.items())))

  def __getattr__(self, name):
    for key, value in self._items:
      if key == name:
        return value
    raise AttributeError(f'no method setting {name!r}; there are: '
                         f"{', '.join(k for k, _ in self._items)}")

  def __setattr__(self, name, value):
    raise AttributeError('method settings are read-only')

  def __hash__(self):
    return hash(tuple((k, repr(v)) for k, v in self._items))

  def __eq__(self, other):
    return isinstance(other, Settings) and self._items == other._items

  def to_dict(self):
    return dict(self._items)


def split_names(method: str) -> Tuple[str, ...]:
  return tuple(method.split('+'))


def settings(method: methods.Method, overrides: Optional[Mapping[str, Any]] = None) -> Settings:
  """The method's field defaults with `overrides`; refuses unknown or unacceptable values."""
  overrides = dict(overrides or {})
  if method.init_stage is None and 'init_epochs' in overrides:
    with_stage = ', '.join(m for m in methods.names() if methods.get(m).init_stage)
    raise ValueError(f'method {method.name!r} has no init stage (init_terms), so no '
                     f'config.distill.{method.name}.init_epochs; methods with one: {with_stage}')
  unknown = sorted(set(overrides) - set(method.fields))
  if unknown:
    raise ValueError(f'config.distill.{method.name}.{unknown[0]} is not a field of method '
                     f"{method.name!r}; its fields: {', '.join(method.fields) or 'none'}")
  values = {}
  for name, field in method.fields.items():
    value = overrides.get(name, field.default)
    if field.check is not None and not field.check(value):
      raise ValueError(f'config.distill.{method.name}.{name}={value!r} is not accepted; '
                       f'expected {field.accepted}')
    values[name] = value
  return Settings(values)


@dataclasses.dataclass(frozen=True)
class InitStage:
  """The init stage of a run: method `method`'s init_terms train `trains` (its
  Method.init_stage) for `epochs` epochs at a constant `learning_rate` (None: the run's)."""
  method: str
  trains: str
  epochs: int
  learning_rate: Optional[float] = None


@dataclasses.dataclass(frozen=True)
class Distiller:
  """The modules of a run's methods, applied one after the other."""
  parts: Tuple[Tuple[str, Any], ...]  # (method name, flax module)
  ce_weight: float
  needs_teacher: bool  # in the main stage's step (an init stage always runs the teacher)
  init_stage: Optional[InitStage] = None  # None: no init stage
  # Methods whose main stage adds nothing: an init stage, then weight 0 (RepDistiller's
  # AB and FSP). Their modules are not run there, as RepDistiller does not run them: no
  # terms, no connector statistics, and no teacher forward when no other method needs it.
  main_stage_off: Tuple[str, ...] = ()

  def init(self, rng, student, teacher, batch, progress):
    variables = {c: {} for c in COLLECTIONS}
    for i, (name, module) in enumerate(self.parts):
      part = module.init({'params': jax.random.fold_in(rng, i), 'state': jax.random.fold_in(rng, 100 + i)},
                         student, teacher, batch, progress, train=False)
      for collection, tree in part.items():
        if collection not in COLLECTIONS:
          raise ValueError(f'method {name!r} made variables of collection {collection!r}; '
                           f'methods may use {COLLECTIONS}')
        variables[collection][name] = tree
    return variables

  def apply(self, variables, student, teacher, batch, progress, train: bool):
    """(terms, updated mutable collections)."""
    terms, updates = {}, {c: dict(variables.get(c, {})) for c in MUTABLE}
    for name, module in self.parts:
      if name in self.main_stage_off:
        continue
      own = {c: variables[c][name] for c in COLLECTIONS if name in variables.get(c, {})}
      if train:
        out, new = module.apply(own, student, teacher, batch, progress, train=True,
                                mutable=list(MUTABLE))
        for collection, tree in new.items():
          updates[collection][name] = tree
      else:
        out = module.apply(own, student, teacher, batch, progress, train=False)
      for term, value in out.items():
        if term in terms:
          raise ValueError(f'two methods of this run return a term named {term!r}')
        terms[term] = _float32_or_wider(value)
    return terms, updates

  def init_terms(self, variables, student, teacher, batch, progress):
    """(terms, updated mutable collections) of the init stage's method, in train mode."""
    name = self.init_stage.method
    module = dict(self.parts)[name]
    own = {c: variables[c][name] for c in COLLECTIONS if name in variables.get(c, {})}
    out, new = module.apply(own, student, teacher, batch, progress, train=True,
                            method='init_terms', mutable=list(MUTABLE))
    updates = {c: dict(variables.get(c, {})) for c in MUTABLE}
    for collection, tree in new.items():
      updates[collection][name] = tree
    return {k: _float32_or_wider(v) for k, v in out.items()}, updates


def _float32_or_wider(value):
  value = jnp.asarray(value)  # at least float32; float64 stays float64
  return value.astype(jnp.promote_types(value.dtype, jnp.float32))


def off_in_main_stage(fields: Mapping[str, Any]) -> bool:
  """Whether a method with these settings adds nothing after its init stage (weight 0)."""
  return bool(fields.get('init_epochs')) and fields.get('weight') == 0


def build(method: str, overrides: Mapping[str, Mapping[str, Any]], ctx: methods.Context,
          ce_weight: Optional[float] = None) -> Distiller:
  """The Distiller of `method` ('a' or 'a+b'), fields from overrides[<name>]."""
  parts, weight, needs_teacher, init_stages, off = [], 1.0, False, [], []
  for name in split_names(method):
    spec = methods.get(name)
    cfg = settings(spec, overrides.get(name))
    if spec.init_stage is not None and cfg.init_epochs:
      init_stages.append(InitStage(name, spec.init_stage, cfg.init_epochs,
                                   cfg.init_learning_rate))
      if off_in_main_stage(cfg.to_dict()):
        off.append(name)
    try:
      module = spec.build(cfg, ctx)
    except (ValueError, KeyError, TypeError) as e:
      detail = str(e).splitlines()[0] if str(e) else type(e).__name__
      raise ValueError(f'method {name!r} cannot distil between these models: {detail}') from None
    parts.append((name, module))
    weight *= spec.ce_weight(cfg) if callable(spec.ce_weight) else spec.ce_weight
    needs_teacher |= spec.needs_teacher and name not in off
  if len(init_stages) > 1:
    raise ValueError('one method of a run may have an init stage, not '
                     f"{', '.join(s.method for s in init_stages)} (their init_epochs)")
  return Distiller(tuple(parts), weight if ce_weight is None else ce_weight, needs_teacher,
                   init_stages[0] if init_stages else None, tuple(off))


def example_inputs(ctx: methods.Context, batch_size: int):
  """Zero arrays shaped like what the modules are called with, for init."""
  zeros = lambda shapes: None if shapes is None else {
      k: jnp.zeros((batch_size, *v.shape[1:]), jnp.float32) for k, v in shapes.items()}
  batch = {'label': jnp.zeros((batch_size,), jnp.int32),
           'index': jnp.arange(batch_size, dtype=jnp.int32), 'key': jax.random.key(0)}
  progress = {'epoch': jnp.int32(1), 'step': jnp.int32(0)}
  return zeros(ctx.student), zeros(ctx.teacher), batch, progress


def for_models(method: str, overrides: Mapping[str, Mapping[str, Any]], model, teacher_model,
               *, batch_size: int, num_classes: int, train_size: int, steps_per_epoch: int,
               image_shape=(32, 32, 3), ce_weight: Optional[float] = None):
  """(Distiller, Context) of `method` between two kd_jax models (teacher_model None for
  'base'), traced once on shapes: refuses in one line a pair the methods cannot use."""
  from kd_jax import models  # pylint: disable=g-import-not-at-top
  shapes = lambda m: None if m is None else models.feature_shapes(m, batch_size, image_shape)
  ctx = methods.Context(student=shapes(model), teacher=shapes(teacher_model),
                        num_classes=num_classes, train_size=train_size,
                        steps_per_epoch=steps_per_epoch)
  distiller = build(method, overrides, ctx, ce_weight)
  example = example_inputs(ctx, batch_size)
  for name, module in distiller.parts:
    try:
      rngs = {'params': jax.random.key(0), 'state': jax.random.key(1)}
      jax.eval_shape(lambda m=module: m.init(rngs, *example, train=False))
    except (ValueError, TypeError, KeyError) as e:
      detail = str(e).splitlines()[0] if str(e) else type(e).__name__
      raise ValueError(f'method {name!r} cannot compare these outputs: {detail}') from None
  return distiller, ctx


def init_variables(distiller: Distiller, ctx: methods.Context, rng, batch_size: int,
                   train_labels=None):
  """The methods' initial variables {'params', 'batch_stats', 'method_state'};
  `train_labels` ([train_size] ints, by dataset index) when the feed has them."""
  student, teacher, batch, progress = example_inputs(ctx, batch_size)
  if train_labels is not None:
    batch['train_labels'] = jnp.asarray(train_labels, jnp.int32)
  return jax.jit(distiller.init)(rng, student, teacher, batch, progress)
