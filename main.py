"""Trains one kd_jax run: a baseline or a student distilled from a teacher.

  python main.py --config=configs/st_cifar100.py --workdir=runs/
  python main.py --config=configs/base_cifar10.py:smoke --workdir=runs/ \
      --config.data_dir=../shared/tfds

The run goes to a directory under --workdir named after its method, dataset, models
and seed; rerunning the same command resumes it. Any config field can be overridden
with --config.<field>=<value>.
"""
import sys

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Path to a config file (configs/*.py).',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'Root directory of runs (created if needed).')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  del argv
  # Orbax logs every step of every save at INFO; keep the run's own log readable.
  logging.get_absl_handler().addFilter(lambda record: 'orbax' not in record.pathname)
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], 'GPU')  # the input pipeline must leave the GPU to JAX
  from kd_jax import train  # pylint: disable=g-import-not-at-top
  try:
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except ValueError as e:
    logging.error('%s', e)
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)


if __name__ == '__main__':
  app.run(main)
