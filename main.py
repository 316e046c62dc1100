"""Trains one kd_jax run: a baseline or a student distilled from a teacher.

  python main.py --config=configs/st_cifar100.py --workdir=runs/
  python main.py --config=configs/base_cifar10.py:smoke --workdir=runs/ \
      --config.data_dir=../shared/tfds

The run goes to a directory under --workdir named after its method, dataset, models
and seed; rerunning the same command resumes it. Any config field can be overridden
with --config.<field>=<value>. Every local device is used (jax.pmap); for several
hosts, run the same command on each with --coordinator_address, --num_processes and
--process_id, or with --multihost where JAX detects the cluster (SLURM, Cloud TPU).
"""
import sys

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Path to a config file (configs/*.py).',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'Root directory of runs (created if needed).')
flags.DEFINE_string('coordinator_address', None,
                    'host:port of process 0, for a run over several processes.')
flags.DEFINE_integer('num_processes', None, 'Number of processes of a multi-process run.')
flags.DEFINE_integer('process_id', None, 'This process\'s index, 0 .. num_processes - 1.')
flags.DEFINE_bool('multihost', False, 'Join a multi-process run that JAX detects itself.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  del argv
  # Orbax logs every step of every save at INFO; keep the run's own log readable.
  logging.get_absl_handler().addFilter(lambda record: 'orbax' not in record.pathname)
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], 'GPU')  # the input pipeline must leave the GPU to JAX
  from kd_jax import parallel, train  # pylint: disable=g-import-not-at-top
  parallel.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes,
                                  FLAGS.process_id, auto=FLAGS.multihost)
  try:
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except ValueError as e:
    logging.error('%s', e)
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)


if __name__ == '__main__':
  app.run(main)
