"""Throughput of the KD train step, evaluation, input path and whole epochs.

  python -m kd_jax.benchmark                      # every method, ResNet-20 and -110 pairs
  python -m kd_jax.benchmark --methods=st --models=resnet_32_20 --json=bench.json
  python -m kd_jax.benchmark --methods=kd --standard_pairs --batch=64,128 --step_only

For each method and (student = teacher) model it measures, at batch `--batch`:
- step: train-step images/s, median over `--steps` timed steps after warm-up, each
  step waited for (block_until_ready);
- compile: seconds to lower and compile that train step;
- eval: evaluation images/s (forward pass, batches of `--eval_batch`, median);
- input: the on-device input path alone (gather + crop/flip/normalise of a batch from
  the uint8 split on the device), images/s; and once per run the tf.data path when
  TensorFlow is installed;
- students_img_s (with --students=N): N students vmapped in one program, images/s
  summed over them (a small model fills a large accelerator this way);
- e2e: an epoch-sized slice as the training loop runs it: `--epoch_images` train images
  in dispatches of `--steps_per_dispatch` scanned steps that gather and augment their
  own batches, then evaluation of a fifth as many test images (CIFAR's ratio), images/s
  of training over the whole time, compilation excluded.
Data are random uint8 images (the speed does not depend on the pixels), so this runs
without TensorFlow or a dataset, e.g. on a GPU machine with only jax, flax and optax.
Every row carries the device kind and count, the versions and the batch size.
"""
import functools
import json
import os
import platform
import statistics
import sys
import time
import types
from typing import Dict, List

import flax
import jax
from absl import flags
import jax.numpy as jnp
import numpy as np
import optax

from kd_jax import device_data, methods, models, standard, steps
from kd_jax.methods import distiller as distiller_lib
MEAN, STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
DTYPES = {'float32': None, 'bfloat16': jnp.bfloat16}


def _median_rate(fn, images_per_call: int, repeats: int) -> float:
  """images/s of fn() (which blocks), median over `repeats` calls after two warm-ups."""
  for _ in range(2):
    fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return images_per_call / statistics.median(times)


def _random_split(rng, num_examples: int, num_classes: int):
  return {'image': jnp.asarray(rng.integers(0, 256, (num_examples, 32, 32, 3), np.uint8)),
          'label': jnp.asarray(rng.integers(0, num_classes, num_examples).astype(np.int32))}


def bench_pair(method_name: str, pair: str, args) -> Dict:
  """One row: the measurements of one method on `pair`, 'teacher>>student' or one model
  name (student = teacher), with the methods' default settings."""
  dtype = DTYPES[args.dtype]
  teacher_name, _, model_name = pair.rpartition('>>')
  teacher_name = teacher_name or model_name
  model = models.create_model(model_name, args.classes, dtype=dtype)
  needs_teacher = method_name != 'base'
  teacher_model = models.create_model(teacher_name, args.classes, dtype=dtype) if needs_teacher else None
  steps_per_epoch = args.epoch_images // args.batch
  distiller, ctx = distiller_lib.for_models(
      method_name, {}, model, teacher_model, batch_size=args.batch, num_classes=args.classes,
      train_size=args.epoch_images, steps_per_epoch=steps_per_epoch)
  teacher = None
  if needs_teacher:
    bn_mode = methods.get(distiller_lib.split_names(method_name)[0]).teacher_bn_mode
    teacher = steps.Teacher(teacher_model, models.init_variables(teacher_model, jax.random.key(1)),
                            bn_mode == 'batch')
  tx = steps.create_optimizer(steps.lr_schedule(0.1, steps_per_epoch, (100, 150), 0.1), 0.9, 1e-4)
  new_state = lambda: steps.create_train_state(
      model, models.init_variables(model, jax.random.key(0)), tx, 0,
      distiller_lib.init_variables(distiller, ctx, jax.random.key(2), args.batch))
  step_kw = dict(model=model, distiller=distiller, steps_per_epoch=steps_per_epoch)
  rng = np.random.default_rng(0)
  train = _random_split(rng, args.epoch_images, args.classes)
  eval_images = max(args.epoch_images // 5 // args.eval_batch, 1) * args.eval_batch
  evaluation = _random_split(rng, eval_images, args.classes)
  row = {'method': method_name, 'student': model_name,
         'teacher': teacher_name if needs_teacher else None, 'batch': args.batch,
         'dtype': args.dtype, **environment()}

  # The train step alone, on a batch already on the device.
  batch = {'image': device_data.normalize(train['image'][:args.batch], MEAN, STD),
           'label': train['label'][:args.batch]}
  step = jax.jit(functools.partial(steps.train_step, **step_kw), donate_argnums=(0,))
  state = new_state()
  start = time.perf_counter()
  compiled = step.lower(state, batch, teacher).compile()
  row['compile_s'] = time.perf_counter() - start
  holder = [state]

  def one_step():
    holder[0], metrics = compiled(holder[0], batch, teacher)
    jax.block_until_ready(metrics)

  row['step_img_s'] = _median_rate(one_step, args.batch, args.steps)
  if args.step_only:
    return row

  # Evaluation: forward passes in eval mode.
  eval_step = jax.jit(functools.partial(steps.eval_step, model=model))
  eval_batch = {'image': device_data.normalize(evaluation['image'][:args.eval_batch], MEAN, STD),
                'label': evaluation['label'][:args.eval_batch],
                'mask': jnp.ones(args.eval_batch, bool)}
  variables = holder[0].student_variables()
  row['eval_img_s'] = _median_rate(
      lambda: jax.block_until_ready(eval_step(variables, eval_batch)), args.eval_batch,
      args.steps)

  # The on-device input path alone.
  @jax.jit
  def make_batch(step_index):
    permutation = device_data.epoch_permutation(0, 0, args.epoch_images)
    indices = device_data.batch_indices(permutation, step_index, args.batch)
    keys = device_data.example_keys(0, 0, step_index * args.batch + jnp.arange(args.batch))
    return device_data.augment(train['image'][indices], keys, MEAN, STD)

  row['input_img_s'] = _median_rate(lambda: jax.block_until_ready(make_batch(1)), args.batch,
                                    args.steps)

  # An epoch-sized slice as the training loop runs it (device feed, scanned steps).
  k = args.steps_per_dispatch
  run = jax.jit(functools.partial(
      steps.train_steps_on_device, num_steps=k, batch_size=args.batch, num_shards=1,
      augment=True, mean=MEAN, std=STD, **step_kw), donate_argnums=(0,))
  eval_data = {'image': evaluation['image'].reshape(-1, args.eval_batch, 32, 32, 3),
               'label': evaluation['label'].reshape(-1, args.eval_batch),
               'mask': jnp.ones((eval_images // args.eval_batch, args.eval_batch), bool)}
  run_eval = jax.jit(functools.partial(steps.eval_on_device, model=model,
                                       batch_size=args.eval_batch, num_shards=1, mean=MEAN,
                                       std=STD))

  def epoch(state, epoch_index):
    for first in range(0, steps_per_epoch, k):
      state, metrics = run(state, train, 0, epoch_index, first, min(k, steps_per_epoch - first),
                           teacher)
    jax.device_get(metrics)  # the loop reads the epoch's metrics once
    sums = run_eval(state.student_variables(), eval_data)
    jax.device_get(sums)
    return state

  state = epoch(new_state(), 0)  # compiles
  start = time.perf_counter()
  epoch(state, 1)
  row['e2e_img_s'] = steps_per_epoch * args.batch / (time.perf_counter() - start)
  row['e2e_train_images'], row['e2e_eval_images'] = steps_per_epoch * args.batch, eval_images

  if args.students > 1:  # several students (seeds) vmapped in one program
    vmapped = jax.jit(functools.partial(
        steps.over_students(steps.train_steps_on_device, student_args=(0, 2)), num_steps=k, batch_size=args.batch, num_shards=1,
        augment=True, mean=MEAN, std=STD, **step_kw), donate_argnums=(0,))
    num_steps = min(k, steps_per_epoch)
    holder = [jax.tree.map(lambda *xs: jnp.stack(xs),
                           *(new_state() for _ in range(args.students)))]

    def dispatch():
      holder[0], metrics = vmapped(holder[0], train, jnp.arange(args.students), 0, 0,
                                   num_steps, teacher)
      jax.block_until_ready(metrics)

    row['students'] = args.students
    row['students_img_s'] = _median_rate(dispatch, args.students * num_steps * args.batch, 3)
  return row


def tfds_input_rate(args) -> float:
  """images/s of the tf.data train path (after its cache is filled), random images."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from kd_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  with tfds.testing.mock_data(num_examples=args.epoch_images):
    data = input_pipeline.TrainData('cifar100', 'train', args.batch, 0, None)
    for _ in data.epoch(0):  # fills the cache
      pass
    start = time.perf_counter()
    count = sum(len(batch['label']) for batch in data.epoch(1))
  return count / (time.perf_counter() - start)


def environment() -> Dict:
  device = jax.devices()[0]
  return {'backend': jax.default_backend(), 'device_kind': device.device_kind,
          'device_count': jax.device_count(), 'jax': jax.__version__, 'flax': flax.__version__,
          'optax': optax.__version__, 'python': platform.python_version(),
          'xla_flags': os.environ.get('XLA_FLAGS', '')}


COLUMNS = (('method', '{}'), ('teacher', '{}'), ('student', '{}'), ('batch', '{}'), ('dtype', '{}'),
           ('step_img_s', '{:.0f}'), ('compile_s', '{:.1f}'), ('eval_img_s', '{:.0f}'),
           ('input_img_s', '{:.0f}'), ('e2e_img_s', '{:.0f}'))


def table(rows: List[Dict]) -> str:
  """A Markdown table of the rows, then the machine they ran on."""
  columns = COLUMNS + ((('students', '{}'), ('students_img_s', '{:.0f}'))
                       if 'students' in rows[0] else ())
  lines = ['| ' + ' | '.join(name for name, _ in columns) + ' | e2e / step |',
           '|' + '---|' * (len(columns) + 1)]
  for row in rows:
    cells = [fmt.format(row[name]) if name in row else '-' for name, fmt in columns]
    ratio = f"{row['e2e_img_s'] / row['step_img_s']:.2f}" if 'e2e_img_s' in row else '-'
    lines.append('| ' + ' | '.join(cells) + f' | {ratio} |')
  env = rows[0]
  lines.append(f"\n{env['device_count']} x {env['device_kind']} ({env['backend']}), "
               f"jax {env['jax']}, flax {env['flax']}, optax {env['optax']}, "
               f"python {env['python']}, XLA_FLAGS='{env['xla_flags']}'")
  return '\n'.join(lines)


FLAGS = flags.FlagValues()  # its own, so that importing this module defines no global flag
flags.DEFINE_list('methods', ['base', 'logit', 'st', 'at', 'at+st', 'fsp'],
                  'methods (or a+b combinations)', flag_values=FLAGS)
flags.DEFINE_list('models', ['resnet_32_20', 'resnet_32_110'],
                  "a model (student = teacher) or 'teacher>>student' per entry", flag_values=FLAGS)
flags.DEFINE_bool('standard_pairs', False, "the CIFAR-100 standard pairs instead of --models "
                  '(configs/cifar100_standard.py)', flag_values=FLAGS)
flags.DEFINE_list('batch', ['128'], 'batch sizes', flag_values=FLAGS)
flags.DEFINE_integer('eval_batch', 500, 'evaluation batch size', flag_values=FLAGS)
flags.DEFINE_integer('classes', 100, 'number of classes', flag_values=FLAGS)
flags.DEFINE_integer('steps', 10, 'timed steps (median)', flag_values=FLAGS)
flags.DEFINE_integer('steps_per_dispatch', 32, 'scanned steps per dispatch', flag_values=FLAGS)
flags.DEFINE_integer('epoch_images', None, 'train images of the end-to-end slice (default: '
                     '50,000 on an accelerator, 2,560 on CPU)', flag_values=FLAGS)
flags.DEFINE_enum('dtype', 'float32', sorted(DTYPES), 'compute dtype', flag_values=FLAGS)
flags.DEFINE_integer('students', 1, 'also time N students (seeds) trained together, vmapped: '
                     'students_img_s counts the images of all of them', flag_values=FLAGS)
flags.DEFINE_bool('step_only', False, 'measure the train step and its compilation only',
                  flag_values=FLAGS)
flags.DEFINE_string('json', None, 'also write the rows here', flag_values=FLAGS)


def _error(message):
  print(f'error: {message}', file=sys.stderr)
  raise SystemExit(2)


def main(argv=None):
  try:
    FLAGS(['kd_jax.benchmark', *(sys.argv[1:] if argv is None else argv)])
  except flags.Error as e:
    _error(str(e))
  if FLAGS.standard_pairs:
    pairs = list(standard.PAIRS)
  else:
    pairs = FLAGS.models
  try:  # refuse unknown names before any work
    batches = [int(b) for b in FLAGS.batch]
    for name in FLAGS.methods:
      for part in distiller_lib.split_names(name):
        methods.get(part)
    for pair in pairs:
      for name in pair.split('>>'):
        models.create_model(name, FLAGS.classes)
  except ValueError as e:
    _error(str(e))
  epoch_images = FLAGS.epoch_images or (2560 if jax.default_backend() == 'cpu' else 50000)
  rows = []
  for batch in batches:
    args = types.SimpleNamespace(**{name: FLAGS[name].value for name in FLAGS})
    args.batch, args.epoch_images = batch, epoch_images
    if args.epoch_images < batch:
      _error(f'--epoch_images={epoch_images} is smaller than --batch={batch}')
    for pair in pairs:
      for method_name in FLAGS.methods:
        rows.append(bench_pair(method_name, pair, args))
        print(json.dumps(rows[-1]), flush=True)
  report = {'rows': rows}
  try:
    report['tfds_input_img_s'] = None if FLAGS.step_only else tfds_input_rate(args)
  except ImportError:
    report['tfds_input_img_s'] = None  # no TensorFlow here (e.g. a GPU machine)
  print(table(rows))
  if report['tfds_input_img_s'] is not None:
    print(f"tf.data input path alone: {report['tfds_input_img_s']:.0f} images/s")
  if FLAGS.json:
    with open(FLAGS.json, 'w') as f:
      json.dump(report, f, indent=2)


if __name__ == '__main__':
  main()
