"""Where a distillation run's teacher comes from, and checks that it fits.

`config.teacher.checkpoint` names the source:
- '' : the baseline run of `teacher.model` on the same dataset, in its own run
  directory under the same --workdir (see `teacher_config`); trained first when it has
  no best checkpoint yet and `teacher.auto_train` is on, and reused by every later
  student that names the same teacher;
- a kd_jax run directory: its best checkpoint;
- a `.pth` file saved by the reference ({'weight': state_dict}): imported (needs torch).
"""
import os
from typing import Callable, Mapping

import jax
import ml_collections
import numpy as np
from absl import logging

from kd_jax import checkpoints, models, torch_import


def teacher_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The baseline run that trains `config`'s teacher: same data and schedule."""
  teacher = ml_collections.ConfigDict(config.to_dict())
  teacher.method = 'base'
  teacher.model = config.teacher.model
  teacher.seed = config.teacher.seed
  if config.teacher.get('learning_rate') is not None:
    teacher.learning_rate = config.teacher.learning_rate
  teacher.num_seeds = 1
  teacher.name = ''
  teacher.teacher.checkpoint = ''
  teacher.distill = ml_collections.ConfigDict()
  teacher.ce_weight = None
  return teacher


def load_teacher_variables(config: ml_collections.ConfigDict, template: Mapping,
                           dataset_info, default_run_dir: str,
                           train_teacher: Callable[[ml_collections.ConfigDict], object]):
  """The teacher's {'params', 'batch_stats'} (numpy), checked against `template`."""
  source = config.teacher.checkpoint
  if source.endswith('.pth'):
    if not os.path.isfile(source):
      raise ValueError(f'teacher file {source!r} does not exist')
    logging.info('Teacher: importing the PyTorch checkpoint %s', source)
    model = models.create_model(config.teacher.model, dataset_info.num_classes)
    return _cast_like(torch_import.load_pth(source, model, template), template)

  run_dir = source or default_run_dir
  if not checkpoints.has_best(run_dir):
    if source:
      raise ValueError(f'teacher.checkpoint {source!r} is neither a kd_jax run directory with '
                       'a best checkpoint nor a .pth file')
    if not config.teacher.auto_train:
      raise ValueError(f'no teacher checkpoint in {run_dir!r} and teacher.auto_train is '
                       'False; train it first (configs/base_*.py) or set teacher.checkpoint')
    logging.info('Teacher %s on %s: no checkpoint in %s yet, training it first.',
                 config.teacher.model, config.dataset, run_dir)
    train_teacher(teacher_config(config))
  logging.info('Teacher: loading the best checkpoint of %s', run_dir)
  variables, meta = checkpoints.restore_best(run_dir)
  if (meta.get('num_classes'), tuple(meta.get('image_shape', ()))) != (
      dataset_info.num_classes, tuple(dataset_info.image_shape)):
    raise ValueError(
        f"teacher in {run_dir!r} was trained on {meta.get('dataset')!r} "
        f"({meta.get('num_classes')} classes, images {tuple(meta.get('image_shape', ()))}); "
        f'{config.dataset!r} has {dataset_info.num_classes} classes, images '
        f'{tuple(dataset_info.image_shape)}')
  # Checkpoints written unrolled (scan_blocks=False, or before blocks were scanned) fit too.
  variables = models.to_layout_of({k: variables[k] for k in ('params', 'batch_stats')}, template)
  models.check_variables(variables, template, f'teacher checkpoint in {run_dir!r}')
  return _cast_like(variables, template)


def _cast_like(variables, template):
  return jax.tree.map(lambda a, t: np.asarray(a).astype(t.dtype), variables, template)
