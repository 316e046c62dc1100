"""How the training loop gets its data to the devices: two interchangeable feeds.

- 'device' (the default): the whole uint8 split lives on every device; each dispatch
  runs up to `steps_per_dispatch` train steps in one XLA program that gathers and
  augments its own batches (kd_jax.device_data). The host sends three numbers.
- 'tfds': tf.data batches from the host (kd_jax.input_pipeline), stacked
  `steps_per_dispatch` at a time and scanned over in one program.

A feed runs the steps of each stage it was given ({'main': train_step's keyword
arguments, 'init': those of init_stage_step, when the run has an init stage}) on the
same data path. Both give a dispatch's per-step metrics as arrays [steps_per_dispatch]
of which the first `num_steps` are real, and evaluate a whole split in one call per epoch on the
device path. Every feed works on a leading students axis (steps.over_students): states,
variables and metrics [students, ...], one student per seed; the tf.data feed takes one
(its batches follow one seed's data order). The two paths draw the same distributions from different random streams.
"""
import functools
import itertools
import math
from typing import Dict, List

import jax
import jax.numpy as jnp
import numpy as np

from kd_jax import input_pipeline, parallel, steps


class DeviceTrainFeed:
  """Train steps on the split held by the devices, of one student or of one per seed
  (vmapped, states stacked on a leading axis)."""

  def __init__(self, config, info, stages, seeds):
    images, labels = input_pipeline.load_arrays(config.dataset, config.train_split,
                                                config.data_dir)
    self.num_examples = len(labels)
    self.labels = labels  # the split's labels, by dataset index (CRD's negatives)
    self.steps_per_epoch = self.num_examples // config.batch_size
    _check_steps(self.steps_per_epoch, config.batch_size, self.num_examples, config.train_split)
    self._data = parallel.replicate({'image': images, 'label': labels})
    self._seeds = jnp.asarray(seeds)
    run = steps.over_students(steps.train_steps_on_device, student_args=(0, 2))
    self._runs = {stage: parallel.device_parallel(
        functools.partial(run, num_steps=config.steps_per_dispatch,
                          batch_size=config.batch_size, num_shards=jax.device_count(),
                          augment=config.augment, padding_mode=config.crop_padding,
                          mean=info.mean, std=info.std, **step_kw),
        in_axes=(None, 0, None, None, None, None, None), donate_argnums=(0,))
                  for stage, step_kw in stages.items()}

  def run(self, state, teacher, epoch: int, first_step: int, num_steps: int, stage='main'):
    """Steps first_step .. first_step + num_steps - 1 of the epoch."""
    return self._runs[stage](state, self._data, self._seeds, epoch, first_step, num_steps,
                             teacher)


class HostTrainFeed:
  """Train steps on tf.data batches, `steps_per_dispatch` per transfer."""
  labels = None  # not read ahead: methods learn the labels from the batches

  def __init__(self, config, info, stages, seeds):
    if list(seeds) != [config.seed]:
      raise ValueError(f'the tf.data feed trains one seed per run, not {list(seeds)}')
    self._data = input_pipeline.TrainData(config.dataset, config.train_split,
                                          config.batch_size, config.seed, config.data_dir,
                                          augment=config.augment,
                                          padding_mode=config.crop_padding, info=info)
    self.num_examples = self._data.num_examples
    self.steps_per_epoch = self._data.steps_per_epoch
    self._k = config.steps_per_dispatch
    self._position = None  # (epoch, next step) of self._batches
    self._batches = None
    self._runs = {stage: parallel.device_parallel(
        functools.partial(steps.over_students(steps.train_steps_from_batches), **step_kw),
        in_axes=(None, 1, None, None), donate_argnums=(0,)) for stage, step_kw in stages.items()}

  def run(self, state, teacher, epoch: int, first_step: int, num_steps: int, stage='main'):
    if self._position != (epoch, first_step):
      self._batches = self._data.epoch(epoch, start_step=first_step)
    batches = list(itertools.islice(self._batches, num_steps))
    self._position = (epoch, first_step + num_steps)
    # Pad to the compiled length; the padding steps are not run.
    batches += batches[-1:] * (self._k - num_steps)
    stacked = jax.tree.map(lambda *xs: np.stack(xs), *batches)
    return self._runs[stage](state, parallel.shard(stacked, axis=1), num_steps, teacher)


class DeviceEvalFeed:
  """Evaluation of a split held by the devices, in one call, of one student or of
  several (vmapped; variables stacked on a leading axis)."""

  def __init__(self, config, info, model):
    images, labels = input_pipeline.load_arrays(config.dataset, config.eval_split,
                                                config.data_dir)
    self.num_examples = len(labels)
    batch_size = config.eval_batch_size
    num_batches = math.ceil(self.num_examples / batch_size)
    pad = num_batches * batch_size - self.num_examples
    data = {'image': np.pad(images, ((0, pad), (0, 0), (0, 0), (0, 0))),
            'label': np.pad(labels, (0, pad)),
            'mask': np.arange(num_batches * batch_size) < self.num_examples}
    data = jax.tree.map(lambda x: x.reshape(num_batches, batch_size, *x.shape[1:]), data)
    self._data = parallel.replicate(data)
    self._run = parallel.device_parallel(
        functools.partial(steps.over_students(steps.eval_on_device), model=model, batch_size=batch_size,
                          num_shards=jax.device_count(), mean=info.mean, std=info.std),
        in_axes=(None, 0))

  def evaluate(self, variables) -> List[Dict[str, float]]:
    """[{'loss', 'accuracy', 'count'}] of each student."""
    return _per_student(jax.device_get(self._run(variables, self._data)))


class HostEvalFeed:
  """Evaluation on tf.data batches, one call per batch."""

  def __init__(self, config, info, model):
    self._data = input_pipeline.EvalData(config.dataset, config.eval_split,
                                         config.eval_batch_size, config.data_dir, info=info)
    self.num_examples = self._data.num_examples
    self._step = parallel.data_parallel(
        functools.partial(steps.over_students(steps.eval_step), model=model))

  def evaluate(self, variables) -> List[Dict[str, float]]:
    totals = None
    for batch in self._data:
      sums = self._step(variables, batch)
      totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    return _per_student(jax.device_get(totals))


FEEDS = {'device': (DeviceTrainFeed, DeviceEvalFeed), 'tfds': (HostTrainFeed, HostEvalFeed)}


def _per_student(totals) -> List[Dict[str, float]]:
  """Summaries of totals with a leading students axis, one per student."""
  return [_summarise(jax.tree.map(lambda x: x[i], totals))
          for i in range(len(totals['count']))]


def _summarise(totals) -> Dict[str, float]:
  count = int(totals['count'])
  return {'loss': float(totals['loss_sum']) / count,
          'accuracy': float(totals['correct']) / count, 'count': count}


def _check_steps(steps_per_epoch, batch_size, num_examples, split):
  if steps_per_epoch == 0:
    raise ValueError(f'batch_size {batch_size} is larger than the {num_examples} examples '
                     f'of split {split!r}')
