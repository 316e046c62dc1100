"""The reference's experiment settings, shared by every config in this folder.

Not run directly: each `<method>_<dataset>.py` calls `get_config` with its method and
dataset. The config argument (after ':' in --config) is a comma-separated list of
  smoke       a tiny run (ResNet-8s, 1,024 train / 512 test images, 2 epochs) that
              finishes in about a minute on a laptop CPU;
  depth=N     student and teacher `resnet_32_N` (e.g. depth=110 for the 110 >> 110 cells).
Overriding --config.model changes the student only; the teacher is --config.teacher.model.
Example: --config=configs/st_cifar100.py:depth=110,smoke
"""
import ml_collections

from kd_jax import methods
from kd_jax.methods import distiller


def parse_arg(arg):
  """'depth=110,smoke' -> {'depth': 110, 'smoke': True}."""
  options = {'smoke': False, 'depth': 20}
  for token in filter(None, (arg or '').split(',')):
    key, _, value = token.partition('=')
    if key not in options or (key == 'smoke') == bool(value):
      raise ValueError(f"bad config argument {token!r}; expected 'smoke' and/or 'depth=N'")
    options[key] = int(value) if key == 'depth' else True
  return options


def distill_config(method: str) -> ml_collections.ConfigDict:
  """{method name: {field: default}} for the methods of `method` ('a' or 'a+b')."""
  sections = ml_collections.ConfigDict()
  for name in distiller.split_names(method):
    section = ml_collections.ConfigDict()
    for field_name, field in methods.get(name).fields.items():
      # A None default still takes a number from the command line.
      section[field_name] = (ml_collections.config_dict.placeholder(float)
                             if field.default is None else field.default)
    sections[name] = section
  return sections


def get_config(arg=None, *, method='base', dataset='cifar10'):
  options = parse_arg(arg)
  config = ml_collections.ConfigDict()
  config.method = method
  config.dataset = dataset
  # A local TFDS folder (e.g. ../shared/tfds); None lets TFDS use its default.
  config.data_dir = ml_collections.config_dict.placeholder(str)
  config.train_split = 'train'
  config.eval_split = 'test'
  config.augment = True
  # Random-crop padding: 'reflect' (the seed reference) or 'zero' (RepDistiller, mdistiller).
  config.crop_padding = 'reflect'
  # Per-channel normalisation of [0, 1] pixels; None: the dataset's statistics
  # (kd_jax.input_pipeline.DATASETS).
  config.image_mean = ml_collections.config_dict.placeholder(tuple)
  config.image_std = ml_collections.config_dict.placeholder(tuple)
  # 'device': the whole uint8 split on the accelerator, batches gathered and augmented
  # inside the train step; 'tfds': tf.data batches from the host. Same distributions.
  config.input_pipeline = 'device'
  # Train steps per dispatch (one lax.scan): SIGTERM and checkpoints wait for its end.
  config.steps_per_dispatch = 32

  config.model = f"resnet_32_{options['depth']}"
  config.compute_dtype = 'float32'  # 'bfloat16' computes in bf16, parameters stay fp32
  config.seed = 0
  # Train seeds seed .. seed + num_seeds - 1 together in one program (jax.vmap over
  # students; the 'device' feed), each in the run directory it would have alone, with
  # its result: fills an accelerator that one small model leaves idle. On a CPU,
  # separate runs are faster.
  config.num_seeds = 1

  # Run directory under --workdir; '' names it after method, dataset, models and seed.
  config.name = ''
  config.tag = 'smoke' if options['smoke'] else ''  # appended to derived run names

  config.num_epochs = 200
  config.batch_size = 128
  config.eval_batch_size = 500
  config.learning_rate = 0.1
  config.lr_boundaries = (100, 150)  # epochs after which lr is multiplied by lr_decay
  config.lr_decay = 0.1
  config.momentum = 0.9
  config.nesterov = False
  config.weight_decay = 1e-4  # coupled (PyTorch SGD), on every parameter

  # Mid-epoch checkpoints (0: only at the end of each epoch); SIGTERM/SIGINT always save.
  config.checkpoint_every_steps = 0
  # Skip (instead of stopping at) steps whose loss or gradient is not finite.
  config.skip_nonfinite_steps = False

  config.teacher = ml_collections.ConfigDict()
  config.teacher.model = ''  # set below to the student's model, as the reference's table
  # Where the teacher's weights are: '' for the baseline run of teacher.model on this
  # dataset under the same --workdir (trained first if missing and auto_train), a
  # kd_jax run directory, or a reference PyTorch .pth file ({'weight': state_dict}).
  config.teacher.checkpoint = ''
  config.teacher.auto_train = True
  config.teacher.seed = 0
  # The lr of the teacher's baseline run when it is trained here; None: the student's.
  config.teacher.learning_rate = ml_collections.config_dict.placeholder(float)
  # 'batch': BatchNorm with batch statistics, as the reference runs its teacher;
  # 'running': the teacher's running statistics (eval mode), as RepDistiller and
  # mdistiller do; None: the first method's choice.
  config.teacher.bn_mode = 'batch'

  # Cross-entropy weight; None: the product of the methods' own (e.g. 1 - alpha for st).
  config.ce_weight = ml_collections.config_dict.placeholder(float)
  # Each method's fields, `--config.distill.<method>.<field>=...`; the defaults and their
  # documentation are the method's own (kd_jax/methods/<method>.py).
  config.distill = distill_config(method)
  if method == 'at+st':
    config.distill.st.weight = 0.9  # the reference's at_st

  if options['smoke']:
    config.model = 'resnet_32_8'
    config.train_split = 'train[:1024]'
    config.eval_split = 'test[:512]'
    config.num_epochs = 2
    config.batch_size = 64
    config.eval_batch_size = 256
    config.lr_boundaries = (1,)
  # A plain copy, not a reference: overriding one of the two must not change the other.
  config.teacher.model = config.model
  return config
