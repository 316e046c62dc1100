"""The training loop: config in, a run directory with checkpoints, summaries and
result.json out. `train_and_evaluate` trains one run; `train_runs` (main.py calls it)
trains the runs of `config.num_seeds` seeds together.

A run directory lives under --workdir and is named after its cell (method, dataset,
student, teacher, seed), so every run of a study shares one root and a teacher is
the baseline run of its model, reused by every student that needs it.
"""
import contextlib
import dataclasses
import json
import math
import os
import signal
import threading
import time
from typing import Any, Dict, List, Optional

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from clu import metric_writers, periodic_actions
from flax import traverse_util

from kd_jax import (checkpoints, feeds, input_pipeline, methods, models, parallel, rundir,
                    steps, teachers)
from kd_jax.methods import distiller as distiller_lib
from kd_jax.rundir import (CONFIG_FILE, IF_CONFIG_DIFFERS, RESULT_FILE, config_hash,  # noqa: F401
                           run_identity, run_name)


class Interrupted(Exception):
  """SIGTERM or SIGINT stopped training after a checkpoint was saved."""


class NonFiniteError(FloatingPointError):
  """A training step's loss or gradient was not finite."""


class _StopRequest:
  signal: Optional[str] = None


@contextlib.contextmanager
def _stop_on_signals():
  """SIGTERM and SIGINT ask the loop to save a checkpoint and stop at the next step."""
  stop = _StopRequest()
  if threading.current_thread() is not threading.main_thread():
    yield stop  # signal handlers can only be installed from the main thread
    return

  def request(signum, frame):
    del frame
    stop.signal = signal.Signals(signum).name

  previous = {s: signal.signal(s, request) for s in (signal.SIGTERM, signal.SIGINT)}
  try:
    yield stop
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)
COMPUTE_DTYPES = {'float32': None, 'bfloat16': jnp.bfloat16}  # None: the variables' dtype


class _CompileTime:
  """Seconds JAX spends tracing, lowering and compiling inside the `with` block."""
  EVENTS = ('/jax/core/compile/jaxpr_trace_duration',
            '/jax/core/compile/jaxpr_to_mlir_module_duration',
            '/jax/core/compile/backend_compile_duration')

  def __init__(self):
    self.seconds = 0.0

  def _record(self, event, duration_secs, **_):
    if event in self.EVENTS:
      self.seconds += duration_secs

  def __enter__(self):
    jax.monitoring.register_event_duration_secs_listener(self._record)
    return self

  def __exit__(self, *exc):
    jax.monitoring.unregister_event_duration_listener(self._record)


def validate_config(config: ml_collections.ConfigDict):
  """Refuses values no run can use, before anything is built or written."""
  input_pipeline.get_dataset_info(config.dataset)
  models.create_model(config.model, num_classes=1)  # refuses unknown names
  for name in distiller_lib.split_names(config.method):
    distiller_lib.settings(methods.get(name), config.distill.get(name))
  if config.method != rundir.BASELINE:
    models.create_model(config.teacher.model, num_classes=1)
  checks = [
      ('num_epochs', config.num_epochs, config.num_epochs >= 1, 'an integer >= 1'),
      ('batch_size', config.batch_size, config.batch_size >= 1, 'an integer >= 1'),
      ('eval_batch_size', config.eval_batch_size, config.eval_batch_size >= 1, 'an integer >= 1'),
      ('learning_rate', config.learning_rate, config.learning_rate > 0, 'a number > 0'),
      ('lr_decay', config.lr_decay, config.lr_decay > 0, 'a number > 0'),
      ('momentum', config.momentum, 0 <= config.momentum < 1, 'a number in [0, 1)'),
      ('weight_decay', config.weight_decay, config.weight_decay >= 0, 'a number >= 0'),
      ('lr_boundaries', config.lr_boundaries,
       all(isinstance(e, int) and e > 0 for e in config.lr_boundaries)
       and list(config.lr_boundaries) == sorted(config.lr_boundaries),
       'increasing epochs >= 1'),
      ('compute_dtype', config.compute_dtype, config.compute_dtype in COMPUTE_DTYPES,
       ' or '.join(map(repr, COMPUTE_DTYPES))),
      ('teacher.bn_mode', config.teacher.bn_mode,
       config.teacher.bn_mode in (None, 'batch', 'running'),
       "None (the method's choice), 'batch' or 'running'"),
      ('crop_padding', config.crop_padding, config.crop_padding in ('reflect', 'zero'),
       "'reflect' or 'zero'"),
      ('ce_weight', config.ce_weight, config.ce_weight is None or config.ce_weight >= 0,
       "None (the methods' weight) or a number >= 0"),
      ('checkpoint_every_steps', config.checkpoint_every_steps,
       config.checkpoint_every_steps >= 0, 'an integer >= 0'),
      ('steps_per_dispatch', config.steps_per_dispatch, config.steps_per_dispatch >= 1,
       'an integer >= 1'),
      ('input_pipeline', config.input_pipeline, config.input_pipeline in feeds.FEEDS,
       ' or '.join(map(repr, feeds.FEEDS))),
      ('num_seeds', config.num_seeds, config.num_seeds >= 1, 'an integer >= 1'),
      ('num_seeds', config.num_seeds, config.num_seeds == 1 or config.input_pipeline == 'device',
       "1 with input_pipeline='tfds' (seeds train together on the 'device' feed)"),
      ('num_seeds', config.num_seeds, config.num_seeds == 1 or not config.name,
       "1 with a run name (each seed's run gets its own derived name)"),
  ]
  for name, value, ok, accepted in checks:
    if not ok:
      raise ValueError(f'config.{name}={value!r} is not accepted; expected {accepted}')
  parallel.check_divisible('batch_size', config.batch_size)
  parallel.check_divisible('eval_batch_size', config.eval_batch_size)


def _device_info():
  return {'device_kind': jax.devices()[0].device_kind, 'device_count': jax.device_count(),
          'process_count': jax.process_count(), 'jax_version': jax.__version__,
          'flax_version': flax.__version__}


def seed_configs(config: ml_collections.ConfigDict) -> List[ml_collections.ConfigDict]:
  """The runs that `config` asks for: seeds seed .. seed + num_seeds - 1, each the
  config of the run that seed alone would be (num_seeds 1)."""
  runs = []
  for i in range(config.num_seeds):
    run = ml_collections.ConfigDict(config.to_dict())
    run.seed, run.num_seeds = config.seed + i, 1
    runs.append(run)
  return runs


class _Run:
  """One run of the group trained together: directory, checkpoints, bookkeeping."""

  def __init__(self, config, workdir, if_config_differs):
    self.config = config
    self.name = run_name(config)
    self.dir = os.path.join(workdir, self.name)
    self.config_change = rundir.check_run_dir(self.dir, config, if_config_differs)
    self.result_path = os.path.join(self.dir, RESULT_FILE)
    self.ckpt = self.meta = self.writer = self.result = None

  def prepare_dir(self, stamp):
    """Moves a replaced run aside (restart) or its config and result (resume)."""
    if self.config_change == 'restart' and jax.process_index() == 0:
      os.replace(self.dir, f'{self.dir}.replaced-{stamp}')
      logging.info('Config changed: the old run is now %s.replaced-%s', self.dir, stamp)
    elif self.config_change == 'resume' and jax.process_index() == 0:
      os.replace(os.path.join(self.dir, CONFIG_FILE),
                 os.path.join(self.dir, f'config.replaced-{stamp}.json'))
      if os.path.exists(self.result_path):
        os.replace(self.result_path, os.path.join(self.dir, f'result.replaced-{stamp}.json'))
      logging.info('Config changed: resuming %s with the new config', self.dir)
    os.makedirs(self.dir, exist_ok=True)
    if jax.process_index() == 0 and not os.path.exists(os.path.join(self.dir, CONFIG_FILE)):
      rundir.write_json_atomic(os.path.join(self.dir, CONFIG_FILE),
                         json.loads(self.config.to_json_best_effort()))


def _new_meta():
  # The loop's bookkeeping, checkpointed with the state: `epoch` epochs are complete,
  # `epoch_step` steps of the next one, whose metrics are `epoch_metrics`.
  return {'epoch': 0, 'epoch_step': 0, 'epoch_metrics': [], 'best_accuracy': -1.0,
          'best_epoch': 0, 'train_time_s': 0.0, 'wall_time_s': 0.0, 'skipped_steps': 0,
          'history': [], 'epoch_end_wall_time_s': []}


def _common_step(runs, latest=checkpoints.LATEST) -> int:
  """The step that runs trained together resume from: the earliest of their latest
  checkpoints (in subdirectory `latest`). A group saves its runs one after the other,
  keeping two checkpoints each (and one at step 0), so a group stopped between two of
  its runs' saves goes back to the step before for all of them; its deterministic steps
  redo the same work."""
  saved = [[] if run.config_change == 'restart' else checkpoints.saved_steps(run.dir, latest)
           for run in runs]
  start = min(max(steps_, default=0) for steps_ in saved)
  for run, steps_ in zip(runs, saved):
    if max(steps_, default=0) > start and start not in steps_:
      at = ', '.join(f'{r.name}: {max(s, default=0)}' for r, s in zip(runs, saved))
      raise ValueError(f'the runs trained together are at different steps ({at}) and '
                       f'{run.name} has no checkpoint of step {start}; train them separately '
                       '(--config.num_seeds=1 --config.seed=...)')
  return start


def _stack(trees):
  """The students axis: per-run states stacked on a leading axis (N >= 1)."""
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def _take(tree, i: int):
  return jax.tree.map(lambda x: x[i], tree)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       if_config_differs: str = 'refuse') -> Dict[str, Any]:
  """Trains (or resumes, or trains the teacher first) one run; returns its result."""
  if config.num_seeds != 1:
    raise ValueError(f'config.num_seeds={config.num_seeds} asks for several runs: use '
                     'train.train_runs, which returns their results')
  return train_runs(config, workdir, if_config_differs)[0]


def train_runs(config: ml_collections.ConfigDict, workdir: str,
               if_config_differs: str = 'refuse') -> List[Dict[str, Any]]:
  """Trains (or resumes, or trains the teacher first) the run of each seed of `config`
  (seed, ..., seed + num_seeds - 1) in one program (jax.vmap over students), each in
  the run directory it would have alone; returns their results. Finished runs are
  only read.

  Everything is checked before anything is written. A run directory holding a run
  of another config is refused, or with `if_config_differs` 'restart', moved aside
  and started anew, or with 'resume', continued with the new config.
  """
  validate_config(config)
  workdir = os.path.abspath(workdir)
  rundir.check_writable(workdir)
  runs = [_Run(c, workdir, if_config_differs) for c in seed_configs(config)]
  for run in runs:
    if run.config_change is None and os.path.exists(run.result_path):
      logging.info('Run already finished: %s', run.result_path)
      with open(run.result_path) as f:
        run.result = json.load(f)
  active = [run for run in runs if run.result is None]
  if not active:
    return [run.result for run in runs]
  start = _common_step(active)

  info = input_pipeline.get_dataset_info(config.dataset)
  info = dataclasses.replace(info, mean=tuple(config.image_mean or info.mean),
                             std=tuple(config.image_std or info.std))
  dtype = COMPUTE_DTYPES[config.compute_dtype]
  model = models.create_model(config.model, info.num_classes, dtype=dtype,
                               axis_name=parallel.AXIS)
  teacher_model = None
  if rundir.needs_teacher(config.method):
    teacher_model = models.create_model(config.teacher.model, info.num_classes, dtype=dtype,
                                        axis_name=parallel.AXIS)
  distiller, ctx = _build_distiller(config, info, model, teacher_model)

  # The teacher before any student data reaches a device (it may have to be trained).
  teacher = None
  if teacher_model is not None:
    variables = teachers.load_teacher_variables(
        config, models.variable_shapes(teacher_model, info.image_shape), info,
        default_run_dir=os.path.join(workdir, run_name(teachers.teacher_config(config))),
        train_teacher=lambda teacher_cfg: train_and_evaluate(teacher_cfg, workdir))
    bn_mode = config.teacher.bn_mode or methods.get(
        distiller_lib.split_names(config.method)[0]).teacher_bn_mode
    teacher = steps.Teacher(teacher_model, jax.device_put(variables),
                            batch_stats_mode=bn_mode == 'batch')

  init = distiller.init_stage
  stages = {'main': dict(model=model, distiller=distiller, steps_per_epoch=ctx.steps_per_epoch,
                         skip_nonfinite=config.skip_nonfinite_steps)}
  if init is not None:
    # RepDistiller's init stage: SGD as the main stage's, at a constant lr.
    init_tx = steps.create_optimizer(init.learning_rate or config.learning_rate,
                                     config.momentum, config.weight_decay, config.nesterov)
    stages['init'] = dict(step=steps.init_stage_step, model=model, distiller=distiller,
                          head=models.head_modules(model), tx=init_tx)
  train_feed_cls, eval_feed_cls = feeds.FEEDS[config.input_pipeline]
  train_feed = train_feed_cls(config, info, stages, seeds=[run.config.seed for run in active])
  eval_feed = eval_feed_cls(config, info, model)

  stamp = time.strftime('%Y%m%d-%H%M%S', time.gmtime())
  for run in active:
    run.prepare_dir(stamp)
    logging.info('Run %s (%s on %s, %d train / %d test images, %s feed) in %s', run.name,
                 config.method, config.dataset, train_feed.num_examples,
                 eval_feed.num_examples, config.input_pipeline, run.dir)
  schedule = steps.lr_schedule(config.learning_rate, train_feed.steps_per_epoch,
                               config.lr_boundaries, config.lr_decay)
  tx = steps.create_optimizer(schedule, config.momentum, config.weight_decay, config.nesterov)
  new_state = lambda seed: steps.create_train_state(
      model, models.init_variables(model, jax.random.key(seed), info.image_shape), tx, seed,
      distiller_lib.init_variables(distiller, ctx, jax.random.fold_in(jax.random.key(seed), 1),
                                   config.batch_size // jax.device_count(), train_feed.labels))
  states, restored = [], []
  for run in active:
    # Two steps kept: a group stopped while saving goes back to the step all its runs hold.
    run.ckpt = checkpoints.RunCheckpoints(run.dir, keep=2)
    if run.ckpt.discard_after(start):
      logging.info('%s goes back to step %d, where its group is', run.name, start)
    state = new_state(run.config.seed)
    latest = run.ckpt.restore_latest(checkpoints.abstract(state))
    restored.append(latest is not None)
    state, run.meta = latest or (state, _new_meta())
    states.append(state)
    run.writer = metric_writers.create_default_writer(run.dir,
                                                      just_logging=jax.process_index() > 0)
  state = parallel.like_outputs(_stack(states))
  # From the first checkpoint on, SIGTERM/SIGINT save and stop (at the next dispatch).
  with _stop_on_signals() as stop:
    # The main stage's first checkpoint follows the init stage: a run that has one is past
    # it (a group stopped between its runs' first saves redoes it from its last checkpoint).
    if init is not None and not all(restored):
      state = _init_stage(active, state, config, teacher, train_feed, init,
                          stages['init']['head'], stages['init']['tx'], stop)
    if start == 0:  # a step every run of a group holds, should it stop mid-save later
      for i, run in enumerate(active):
        run.ckpt.save_latest(0, _take(state, i), run.meta)
    for run in active:
      checkpoints.remove_init_stage(run.dir)
    _train_group(active, state, config, info, teacher, train_feed, eval_feed, schedule, stop)
  return [run.result for run in runs]


# Init epoch i draws the data order and augmentation of epoch INIT_DATA_EPOCH + i:
# streams apart from the main stage's epochs.
INIT_DATA_EPOCH = 1 << 20


def _new_init_meta():
  return {'epoch': 0, 'epoch_step': 0, 'epoch_metrics': [], 'history': [],
          'wall_time_s': 0.0}


def _init_stage(runs, state, config, teacher, train_feed, init, head, tx, stop):
  """RepDistiller's init stage (helper/pretrain.py) of `runs`, from `state` (their
  stacked fresh train states): `init.epochs` epochs of SGD at a constant lr on the init
  method's `init_terms`, over the same data path, no evaluation. Checkpointed in
  `init_stage/` every epoch (and as the main stage is: checkpoint_every_steps, SIGTERM),
  resumable there. Returns the train states it leaves (step 0, a fresh optimizer) and
  records the stage in each run's meta ('init_stage')."""
  steps_per_epoch = train_feed.steps_per_epoch
  start = _common_step(runs, checkpoints.INIT_STAGE)
  carries = []
  for i, run in enumerate(runs):
    run.init_ckpt = checkpoints.RunCheckpoints(run.dir, keep=2, latest=checkpoints.INIT_STAGE)
    run.init_ckpt.discard_after(start)
    carry = steps.create_init_stage_state(_take(state, i), init, head, tx)
    carry, run.init_meta = (run.init_ckpt.restore_latest(checkpoints.abstract(carry))
                            or (carry, _new_init_meta()))
    carries.append(carry)
  carry = parallel.like_outputs(_stack(carries))
  meta0 = runs[0].init_meta  # the same epoch, epoch_step and wall time in every run
  step = int(_take(carry, 0).step)
  lr = init.learning_rate or config.learning_rate
  logging.info('Init stage of %s (%s trains %s, %d epochs, lr %g)%s', _dirs(runs),
               init.method, init.trains, init.epochs, lr,
               f', resuming from its step {step}' if step else '')
  stage_start = time.time() - meta0['wall_time_s']

  def save():
    for i, run in enumerate(runs):
      run.init_meta['wall_time_s'] = time.time() - stage_start
      run.init_ckpt.save_latest(step, _take(carry, i), run.init_meta)

  if not step:  # a step every run of a group holds, should it stop mid-save later
    save()

  for epoch in range(meta0['epoch'], init.epochs):
    epoch_start, in_epoch = time.time(), meta0['epoch_step']
    while in_epoch < steps_per_epoch:
      num_steps = min(config.steps_per_dispatch, steps_per_epoch - in_epoch)
      if config.checkpoint_every_steps:
        num_steps = min(num_steps, config.checkpoint_every_steps
                        - step % config.checkpoint_every_steps)
      carry, metrics = train_feed.run(carry, teacher, INIT_DATA_EPOCH + epoch, in_epoch,
                                      num_steps, stage='init')
      _collect_init(runs, jax.device_get(metrics), num_steps, step, epoch)
      step += num_steps
      in_epoch += num_steps
      if in_epoch < steps_per_epoch and (stop.signal or (
          config.checkpoint_every_steps and step % config.checkpoint_every_steps == 0)):
        for run in runs:
          run.init_meta['epoch_step'] = in_epoch
        save()
        if stop.signal:
          raise Interrupted(f'stopped by {stop.signal} at init-stage step {step}; the '
                            f'checkpoint is saved in {_dirs(runs)}: rerun the same '
                            'command to resume')
    for run in runs:
      _end_init_epoch(run, epoch, step, init.epochs, time.time() - epoch_start)
    save()
    if stop.signal and epoch + 1 < init.epochs:
      raise Interrupted(f'stopped by {stop.signal} after init epoch {epoch + 1}; the '
                        f'checkpoint is saved in {_dirs(runs)}: rerun the same command '
                        'to resume')
  for run in runs:
    run.init_ckpt.close()
    run.meta['init_stage'] = {
        'method': init.method, 'trains': init.trains, 'epochs': init.epochs, 'steps': step,
        'learning_rate': lr, 'wall_time_s': run.init_meta['wall_time_s'],
        'history': run.init_meta['history']}
  return carry.train


def _collect_init(runs, metrics, num_steps, step, epoch):
  """Keeps the init steps' metrics ([students, steps_per_dispatch]) in each run's
  init meta; a non-finite step stops the run (its last init checkpoint is intact)."""
  for i, run in enumerate(runs):
    per_step = [{k: float(v[i][j]) for k, v in metrics.items()} for j in range(num_steps)]
    for j, m in enumerate(per_step):
      bad = {k: v for k, v in m.items() if not math.isfinite(v)}
      if bad:
        terms = ', '.join(f'{k}={v}' for k, v in bad.items())
        raise NonFiniteError(f'non-finite init-stage step {step + j + 1} (init epoch '
                             f'{epoch + 1}) of {run.dir}: {terms}; lower '
                             'config.distill.<method>.init_learning_rate')
    run.init_meta['epoch_metrics'].extend(per_step)


def _end_init_epoch(run, epoch, step, epochs, seconds):
  """The init epoch's history entry, summaries (init/<metric>) and log line of one run."""
  meta = run.init_meta
  mean = _mean_metrics(meta['epoch_metrics'])
  meta.update(epoch=epoch + 1, epoch_step=0, epoch_metrics=[])
  meta['history'].append({'epoch': epoch + 1, 'step': step,
                          **{f'init_{k}': v for k, v in mean.items()}})
  run.writer.write_scalars(step, {'init/epoch': epoch + 1,
                                  **{f'init/{k}': v for k, v in mean.items()}})
  run.writer.flush()
  terms = ', '.join(f'{k} {v:.4f}' for k, v in mean.items() if k not in ('loss', 'grad_norm'))
  logging.info('%s: init epoch %d/%d: init loss %.4f (%s) | %.1fs', run.name, epoch + 1,
               epochs, mean['loss'], terms, seconds)


def _train_group(runs, state, config, info, teacher, train_feed, eval_feed, schedule, stop):
  """The epoch loop of `runs` (one, or several vmapped: `state` stacked), from their
  common step; sets each run's result."""
  steps_per_epoch = train_feed.steps_per_epoch
  meta0 = runs[0].meta  # epoch, epoch_step and wall_time_s are the same in every run
  step = int(_take(state, 0).step)
  if step:
    logging.info('Resuming from step %d (epoch %d, step %d of %d).', step, meta0['epoch'] + 1,
                 meta0['epoch_step'], steps_per_epoch)
  for run in runs:
    if not step:
      run.writer.write_hparams({
          k: str(v) if isinstance(v, (tuple, list)) else v
          for k, v in traverse_util.flatten_dict(run.config.to_dict(), sep='.').items()
          if v is not None})
  report_progress = periodic_actions.ReportProgress(
      num_train_steps=config.num_epochs * steps_per_epoch, writer=runs[0].writer, every_secs=60)
  run_start = time.time() - meta0['wall_time_s']
  last_saved = step

  def collect(pending):
    """Moves the pending dispatches' metrics to the host, refusing non-finite steps.
    pending: (number of steps run, metrics [(students,) steps_per_dispatch]) per dispatch."""
    host = jax.device_get(pending)
    first = step - sum(n for n, _ in host)
    for i, run in enumerate(runs):
      per_step = [{k: v[i][j] for k, v in metrics.items()}
                  for n, metrics in host for j in range(n)]
      for j, metrics in enumerate(per_step):
        bad = {k: v for k, v in metrics.items() if k != 'skipped' and not math.isfinite(v)}
        if bad and not config.skip_nonfinite_steps:
          terms = ', '.join(f'{k}={v}' for k, v in bad.items())
          raise NonFiniteError(
              f'non-finite training step {first + j + 1} (epoch {epoch + 1}): {terms}; the '
              f'last checkpoint (step {last_saved}) in {run.dir} is intact; lower the learning '
              'rate or set --config.skip_nonfinite_steps=True to skip such steps')
        run.meta['skipped_steps'] += int(metrics.get('skipped', 0))
      run.meta['epoch_metrics'].extend({k: float(v) for k, v in m.items()} for m in per_step)

  def save_latest(end_of_epoch=False):
    nonlocal last_saved
    for i, run in enumerate(runs):
      run.meta['wall_time_s'] = time.time() - run_start
      if end_of_epoch:  # the benchmarks' epoch times (not in history: that is deterministic)
        run.meta.setdefault('epoch_end_wall_time_s', []).append(run.meta['wall_time_s'])
      run.ckpt.save_latest(step, _take(state, i), run.meta)
    last_saved = step

  def add_train_time(seconds):
    for run in runs:
      run.meta['train_time_s'] += seconds

  with _CompileTime() as compile_time:
    for epoch in range(meta0['epoch'], config.num_epochs):
      segment_start = time.time()
      pending = []
      in_epoch = meta0['epoch_step']
      while in_epoch < steps_per_epoch:
        num_steps = min(config.steps_per_dispatch, steps_per_epoch - in_epoch)
        if config.checkpoint_every_steps:
          num_steps = min(num_steps, config.checkpoint_every_steps
                          - step % config.checkpoint_every_steps)
        compiled_before = compile_time.seconds
        state, metrics = train_feed.run(state, teacher, epoch, in_epoch, num_steps)
        segment_start += compile_time.seconds - compiled_before  # compiling is not training
        pending.append((num_steps, metrics))
        step += num_steps
        in_epoch += num_steps
        report_progress(step)
        if in_epoch < steps_per_epoch and (stop.signal or (
            config.checkpoint_every_steps and step % config.checkpoint_every_steps == 0)):
          collect(pending)
          pending = []
          for run in runs:
            run.meta['epoch_step'] = in_epoch
          add_train_time(time.time() - segment_start)
          segment_start = time.time()
          save_latest()
          if stop.signal:
            raise Interrupted(f'stopped by {stop.signal} at step {step}; the checkpoint is '
                              f'saved in {_dirs(runs)}: rerun the same command to resume')
      collect(pending)
      add_train_time(time.time() - segment_start)
      tests = eval_feed.evaluate(state.student_variables())
      lr = float(schedule(step - 1))
      for i, (run, test) in enumerate(zip(runs, tests)):
        _end_epoch(run, epoch, step, lr, test, _take(state, i), info,
                   time.time() - segment_start, label=f'{run.name}: ')
      save_latest(end_of_epoch=True)
      if stop.signal and epoch + 1 < config.num_epochs:
        raise Interrupted(f'stopped by {stop.signal} after epoch {epoch + 1}; the checkpoint '
                          f'is saved in {_dirs(runs)}: rerun the same command to resume')
  for run in runs:
    run.ckpt.close()
    run.writer.close()
    run.result = _result(run, step)


def _dirs(runs) -> str:
  return ', '.join(run.dir for run in runs)


def _mean_metrics(epoch_metrics) -> Dict[str, float]:
  """Each metric's mean over the epoch's steps that have it (an epoch resumed under
  another kd_jax version may have gained or lost one)."""
  keys = dict.fromkeys(k for m in epoch_metrics for k in m)
  return {k: float(np.mean([m[k] for m in epoch_metrics if k in m])) for k in keys}


def _end_epoch(run, epoch, step, lr, test, state, info, seconds, label):
  """The epoch's summaries, history and best checkpoint of one run."""
  meta, config = run.meta, run.config
  train = _mean_metrics(meta['epoch_metrics'])
  meta.update(epoch=epoch + 1, epoch_step=0, epoch_metrics=[])
  if test['accuracy'] > meta['best_accuracy']:
    meta['best_accuracy'], meta['best_epoch'] = test['accuracy'], epoch + 1
    run.ckpt.save_best(step, state.student_variables(),
                       {'model': config.model, 'dataset': config.dataset,
                        'num_classes': info.num_classes, 'image_shape': list(info.image_shape),
                        'epoch': epoch + 1, 'accuracy': test['accuracy']})
  meta['history'].append({'epoch': epoch + 1, 'step': step, 'learning_rate': lr,
                          'test_accuracy': test['accuracy'], 'test_loss': test['loss'],
                          'test_count': test['count'],
                          **{f'train_{k}': v for k, v in train.items()}})
  run.writer.write_scalars(step, {'epoch': epoch + 1, 'learning_rate': lr,
                                  **{f'train/{k}': v for k, v in train.items()},
                                  'test/loss': test['loss'], 'test/accuracy': test['accuracy'],
                                  'test/best_accuracy': meta['best_accuracy']})
  run.writer.flush()
  logging.info('%sepoch %d/%d: train loss %.4f acc %.4f | test loss %.4f acc %.4f '
               '(best %.4f @ %d) | lr %g | %.1fs', label, epoch + 1, config.num_epochs, train['loss'], train['accuracy'], test['loss'],
               test['accuracy'], meta['best_accuracy'], meta['best_epoch'], lr, seconds)


def _result(run, step) -> Dict[str, Any]:
  """Writes and returns result.json of a finished run."""
  meta, config = run.meta, run.config
  last = meta['history'][-1]
  result = {
      'name': run.name, 'method': config.method, 'dataset': config.dataset,
      'model': config.model, 'teacher': config.teacher.model if rundir.needs_teacher(config.method) else None,
      'seed': config.seed, 'best_accuracy': meta['best_accuracy'],
      'best_epoch': meta['best_epoch'], 'final_accuracy': last['test_accuracy'],
      'num_test_images': last['test_count'],
      'epochs': meta['epoch'], 'steps': step, 'batch_size': config.batch_size,
      'wall_time_s': meta['wall_time_s'], 'train_time_s': meta['train_time_s'],
      'skipped_steps': meta['skipped_steps'],
      # RepDistiller's init stage before these epochs (None: none); its time is its own.
      'init_stage': meta.get('init_stage'),
      # Per run (a group's runs share their program); compilation is left out.
      'train_images_per_s': step * config.batch_size / max(meta['train_time_s'], 1e-9),
      'config_hash': config_hash(config), **_device_info(),
      'history': meta['history'],
      'epoch_end_wall_time_s': meta.get('epoch_end_wall_time_s', []),
  }
  if jax.process_index() == 0:
    rundir.write_json_atomic(run.result_path, result)
  logging.info('Done: best test accuracy %.4f at epoch %d; %s', result['best_accuracy'],
               result['best_epoch'], run.result_path)
  return result


def _build_distiller(config, info, model, teacher_model):
  """The run's Distiller and the Context it was sized from; refuses, in one line, methods
  whose features the pair lacks or cannot connect, before anything is written."""
  train_size = input_pipeline.split_size(config.dataset, config.train_split, config.data_dir)
  pair = f'student {config.model!r}' + (
      f', teacher {config.teacher.model!r}' if teacher_model is not None else '')
  try:
    return distiller_lib.for_models(
        config.method, config.distill.to_dict(), model, teacher_model,
        batch_size=config.batch_size // jax.device_count(), num_classes=info.num_classes,
        train_size=train_size, steps_per_epoch=max(train_size // config.batch_size, 1),
        image_shape=info.image_shape, ce_weight=config.ce_weight)
  except ValueError as e:
    raise ValueError(f'{e} ({pair})') from None
