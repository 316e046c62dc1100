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
import re
import signal
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
flags.DEFINE_enum('if_config_differs', 'refuse', ['refuse', 'restart', 'resume'],
                  'When the run directory holds a run of another config: refuse; restart '
                  '(the old run is moved aside, nothing is deleted); or resume it with the '
                  'new config.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  del argv
  # Orbax logs every step of every save at INFO; keep the run's own log readable.
  logging.get_absl_handler().addFilter(lambda record: 'orbax' not in record.pathname)
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], 'GPU')  # the input pipeline must leave the GPU to JAX
  from kd_jax import checkpoints, parallel, train  # pylint: disable=g-import-not-at-top
  parallel.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes,
                                  FLAGS.process_id, auto=FLAGS.multihost)
  try:
    train.train_runs(FLAGS.config, FLAGS.workdir, FLAGS.if_config_differs)
  except ValueError as e:  # bad input: nothing was written
    _fail(e, 2)
  except (train.NonFiniteError, checkpoints.CheckpointError) as e:
    _fail(e, 1)
  except train.Interrupted as e:
    _fail(e, 128 + (signal.SIGINT if 'SIGINT' in str(e) else signal.SIGTERM))


def _fail(error, status):
  logging.error('%s', error)
  print(f'error: {error}', file=sys.stderr)
  sys.exit(status)


def parse_flags(argv):
  """absl's flag parsing, with a bad --config override reported in one line."""
  try:
    remaining = FLAGS(argv)
    FLAGS.config.method  # pylint: disable=pointless-statement  # config_flags loads lazily
    return remaining
  except flags.Error as e:
    message = [line for line in str(e).splitlines() if line.strip()][-1].strip()
  except OSError as e:  # the config file itself
    path = [a for a in argv if a.startswith('--config=')]
    message = (f'cannot load the config file of {path[0] if path else "--config"}: '
               f'{str(e).strip().splitlines()[-1].strip()}')
  except (AttributeError, KeyError) as e:  # ml_collections: a field the config lacks
    text = str(e)
    field = re.search(r"'(\w+)", text)
    hint = re.search(r'Did you mean "(\w+)"', text)
    field = field.group(1) if field else text
    given = [a for a in argv if a.startswith('--config.') and field in a]
    message = (f'unknown config field {field!r} in {given[0] if given else "--config"}'
               f'{f" (did you mean {hint.group(1)!r}?)" if hint else ""}; the fields are '
               'listed in configs/default.py')
  except (TypeError, ValueError) as e:
    message = str(e).splitlines()[0]
  print(f'error: {message}', file=sys.stderr)
  sys.exit(2)


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
