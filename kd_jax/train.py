"""The training loop: config in, a run directory with checkpoints, summaries and
result.json out. `train_and_evaluate` is the entry point (main.py calls it).

A run directory lives under --workdir and is named after its cell (method, dataset,
student, teacher, seed), so every run of a study shares one root and a teacher is
the baseline run of its model, reused by every student that needs it.
"""
import functools
import hashlib
import json
import math
import os
import time
from typing import Any, Dict, Optional

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from clu import metric_writers, periodic_actions
from flax import traverse_util

from kd_jax import checkpoints, distill, input_pipeline, models, parallel, steps, teachers

CONFIG_FILE, RESULT_FILE = 'config.json', 'result.json'
COMPUTE_DTYPES = {'float32': None, 'bfloat16': jnp.bfloat16}  # None: the variables' dtype


def run_name(config: ml_collections.ConfigDict) -> str:
  if config.name:
    return config.name
  name = f'{config.method}_{config.dataset}_{config.model}'
  if distill.get_method(config.method).needs_teacher:
    name += f'_from_{config.teacher.model}'
  name += f'_seed{config.seed}'
  return f'{name}_{config.tag}' if config.tag else name


def run_identity(config) -> Dict[str, Any]:
  """The settings that decide a run's result (of a ConfigDict or its saved JSON):
  where the data lives, what the run directory is called and whether a teacher may
  be trained on demand do not."""
  identity = json.loads(json.dumps(
      config.to_dict() if isinstance(config, ml_collections.ConfigDict) else config))
  for key in ('data_dir', 'name'):
    identity.pop(key, None)
  if distill.get_method(identity['method']).needs_teacher:
    identity['teacher'].pop('auto_train', None)
  else:
    identity.pop('teacher', None)
    identity.pop('kd', None)
  return identity


def config_hash(config: ml_collections.ConfigDict) -> str:
  blob = json.dumps(run_identity(config), sort_keys=True).encode()
  return hashlib.sha256(blob).hexdigest()[:16]


def validate_config(config: ml_collections.ConfigDict):
  """Refuses values no run can use, before anything is built or written."""
  method = distill.get_method(config.method)
  input_pipeline.get_dataset_info(config.dataset)
  models.create_model(config.model, num_classes=1)  # refuses unknown names
  if method.needs_teacher:
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
      ('teacher.bn_mode', config.teacher.bn_mode, config.teacher.bn_mode in ('batch', 'running'),
       "'batch' or 'running'"),
      ('kd.logit_target', config.kd.logit_target, config.kd.logit_target in ('pooled', 'logits'),
       "'pooled' or 'logits'"),
      ('kd.temperature', config.kd.temperature, config.kd.temperature > 0, 'a number > 0'),
      ('kd.alpha', config.kd.alpha, config.kd.alpha is None or 0 <= config.kd.alpha <= 1,
       'None or a number in [0, 1]'),
  ]
  for name, value, ok, accepted in checks:
    if not ok:
      raise ValueError(f'config.{name}={value!r} is not accepted; expected {accepted}')
  parallel.check_divisible('batch_size', config.batch_size)
  parallel.check_divisible('eval_batch_size', config.eval_batch_size)


def _check_run_dir(run_dir: str, config: ml_collections.ConfigDict):
  """Refuses a run directory that holds another run (a different config)."""
  saved_path = os.path.join(run_dir, CONFIG_FILE)
  if os.path.exists(saved_path):
    with open(saved_path) as f:
      saved = run_identity(json.load(f))
    new = run_identity(config)
    differ = sorted(k for k in set(saved) | set(new) if saved.get(k) != new.get(k))
    if differ:
      raise ValueError(f'run directory {run_dir!r} holds a run with another config '
                       f'(differs in: {", ".join(differ)}); choose another --config.name '
                       'or --workdir, or delete it to start over')
  elif os.path.isdir(run_dir) and os.listdir(run_dir):
    raise ValueError(f'run directory {run_dir!r} exists and is not a kd_jax run; '
                     'choose another --config.name or --workdir')


def _write_json_atomic(path: str, obj):
  tmp = f'{path}.tmp'
  with open(tmp, 'w') as f:
    json.dump(obj, f, indent=2)
  os.replace(tmp, path)


def _device_info():
  return {'device_kind': jax.devices()[0].device_kind, 'device_count': jax.device_count(),
          'process_count': jax.process_count(), 'jax_version': jax.__version__,
          'flax_version': flax.__version__}


def evaluate(eval_step, variables, eval_data) -> Dict[str, float]:
  totals = None
  for batch in eval_data:
    sums = eval_step(variables, batch)
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  totals = jax.device_get(totals)
  count = int(totals['count'])
  return {'loss': float(totals['loss_sum']) / count,
          'accuracy': float(totals['correct']) / count, 'count': count}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> Dict[str, Any]:
  """Trains (or resumes, or trains the teacher first) one run; returns its result."""
  validate_config(config)
  workdir = os.path.abspath(workdir)
  run_dir = os.path.join(workdir, run_name(config))
  _check_run_dir(run_dir, config)
  result_path = os.path.join(run_dir, RESULT_FILE)

  info = input_pipeline.get_dataset_info(config.dataset)
  dtype = COMPUTE_DTYPES[config.compute_dtype]
  model = models.create_model(config.model, info.num_classes, dtype=dtype,
                               axis_name=parallel.AXIS)
  method = distill.get_method(config.method)
  if method.needs_teacher:
    teacher_model = models.create_model(config.teacher.model, info.num_classes, dtype=dtype,
                                        axis_name=parallel.AXIS)
    _check_method_fits(method, model, teacher_model, config, info)
  train_data = input_pipeline.TrainData(config.dataset, config.train_split, config.batch_size,
                                        config.seed, config.data_dir, augment=config.augment)
  eval_data = input_pipeline.EvalData(config.dataset, config.eval_split,
                                      config.eval_batch_size, config.data_dir)

  teacher = None
  if method.needs_teacher:
    variables = teachers.load_teacher_variables(
        config, models.variable_shapes(teacher_model, info.image_shape), info,
        default_run_dir=os.path.join(workdir, run_name(teachers.teacher_config(config))),
        train_teacher=lambda teacher_cfg: train_and_evaluate(teacher_cfg, workdir))
    teacher = steps.Teacher(teacher_model, jax.device_put(variables),
                            batch_stats_mode=config.teacher.bn_mode == 'batch')

  os.makedirs(run_dir, exist_ok=True)
  if jax.process_index() == 0 and not os.path.exists(os.path.join(run_dir, CONFIG_FILE)):
    _write_json_atomic(os.path.join(run_dir, CONFIG_FILE), json.loads(config.to_json_best_effort()))
  logging.info('Run %s (%s on %s, %d train / %d test images) in %s', run_name(config),
               config.method, config.dataset, train_data.num_examples, eval_data.num_examples,
               run_dir)

  steps_per_epoch = train_data.steps_per_epoch
  schedule = steps.lr_schedule(config.learning_rate, steps_per_epoch, config.lr_boundaries,
                               config.lr_decay)
  tx = steps.create_optimizer(schedule, config.momentum, config.weight_decay, config.nesterov)
  init_rng = jax.random.key(config.seed)
  state = steps.create_train_state(model, models.init_variables(model, init_rng, info.image_shape),
                                   tx)
  ckpt = checkpoints.RunCheckpoints(run_dir)
  restored = ckpt.restore_latest(checkpoints.abstract(state))
  meta = {'epoch': 0, 'best_accuracy': -1.0, 'best_epoch': 0, 'train_time_s': 0.0,
          'wall_time_s': 0.0, 'history': []}
  if restored is not None:
    state, meta = restored
    logging.info('Resuming from epoch %d (step %d).', meta['epoch'], int(state.step))
  if meta['epoch'] >= config.num_epochs and os.path.exists(result_path):
    logging.info('Run already finished: %s', result_path)
    ckpt.close()
    with open(result_path) as f:
      return json.load(f)

  train_step = parallel.data_parallel(
      functools.partial(steps.train_step, model=model, method=method,
                        kd_config=config.kd.to_dict()), num_broadcast_args=1, donate_state=True)
  eval_step = parallel.data_parallel(functools.partial(steps.eval_step, model=model))
  writer = metric_writers.create_default_writer(run_dir, just_logging=jax.process_index() > 0)
  if restored is None:
    writer.write_hparams({k: str(v) if isinstance(v, (tuple, list)) else v
                          for k, v in traverse_util.flatten_dict(config.to_dict(), sep='.').items()
                          if v is not None})
  num_train_steps = config.num_epochs * steps_per_epoch
  report_progress = periodic_actions.ReportProgress(num_train_steps=num_train_steps,
                                                    writer=writer, every_secs=60)
  run_start = time.time() - meta['wall_time_s']
  step = int(state.step)
  for epoch in range(meta['epoch'], config.num_epochs):
    epoch_start = time.time()
    step_metrics = []
    for batch in train_data.epoch(epoch):
      state, metrics = train_step(state, batch, teacher)
      step_metrics.append(metrics)
      step += 1
      report_progress(step)
    train = {k: float(np.mean(v)) for k, v in
             jax.tree.map(lambda *xs: np.stack(xs), *jax.device_get(step_metrics)).items()}
    meta['train_time_s'] += time.time() - epoch_start
    test = evaluate(eval_step, {'params': state.params, 'batch_stats': state.batch_stats},
                    eval_data)
    meta['epoch'] = epoch + 1
    lr = float(schedule(step - 1))
    if test['accuracy'] > meta['best_accuracy']:
      meta['best_accuracy'], meta['best_epoch'] = test['accuracy'], epoch + 1
      ckpt.save_best(step, {'params': state.params, 'batch_stats': state.batch_stats},
                     {'model': config.model, 'dataset': config.dataset,
                      'num_classes': info.num_classes, 'image_shape': list(info.image_shape),
                      'epoch': epoch + 1, 'accuracy': test['accuracy']})
    meta['history'].append({'epoch': epoch + 1, 'step': step, 'learning_rate': lr,
                            'test_accuracy': test['accuracy'], 'test_loss': test['loss'],
                            'test_count': test['count'],
                            **{f'train_{k}': v for k, v in train.items()}})
    meta['wall_time_s'] = time.time() - run_start
    ckpt.save_latest(step, state, meta)
    writer.write_scalars(step, {'epoch': epoch + 1, 'learning_rate': lr,
                                **{f'train/{k}': v for k, v in train.items()},
                                'test/loss': test['loss'], 'test/accuracy': test['accuracy'],
                                'test/best_accuracy': meta['best_accuracy']})
    writer.flush()
    logging.info('epoch %d/%d: train loss %.4f acc %.4f | test loss %.4f acc %.4f '
                 '(best %.4f @ %d) | lr %g | %.1fs', epoch + 1, config.num_epochs,
                 train['loss'], train['accuracy'], test['loss'], test['accuracy'],
                 meta['best_accuracy'], meta['best_epoch'], lr, time.time() - epoch_start)
  ckpt.close()
  writer.close()

  last = meta['history'][-1]
  result = {
      'name': run_name(config), 'method': config.method, 'dataset': config.dataset,
      'model': config.model, 'teacher': config.teacher.model if method.needs_teacher else None,
      'seed': config.seed, 'best_accuracy': meta['best_accuracy'],
      'best_epoch': meta['best_epoch'], 'final_accuracy': last['test_accuracy'],
      'num_test_images': last['test_count'],
      'epochs': meta['epoch'], 'steps': step, 'batch_size': config.batch_size,
      'wall_time_s': meta['wall_time_s'], 'train_time_s': meta['train_time_s'],
      'train_images_per_s': step * config.batch_size / max(meta['train_time_s'], 1e-9),
      'config_hash': config_hash(config), **_device_info(),
      'history': meta['history'],
  }
  if jax.process_index() == 0:
    _write_json_atomic(result_path, result)
  logging.info('Done: best test accuracy %.4f at epoch %d; %s', result['best_accuracy'],
               result['best_epoch'], result_path)
  return result


def _check_method_fits(method, model, teacher_model, config, info):
  shape = jax.ShapeDtypeStruct((2, *info.image_shape), jnp.float32)

  def outputs(m):
    variables = models.variable_shapes(m, info.image_shape)
    logits, features = jax.eval_shape(functools.partial(m.apply, train=False), variables, shape)
    return {**features, 'logits': logits}

  try:
    distill.check_compatible(method, outputs(model), outputs(teacher_model), config.kd.to_dict())
  except ValueError as e:
    raise ValueError(f'{e} (student {config.model!r}, teacher {config.teacher.model!r})') from None

