"""kd_jax's training loop against mdistiller's own, on the same machine, alternating.

  pip install torch yacs tqdm        # and a checkout of megvii-research/mdistiller
  python -m kd_jax.benchmark_mdistiller --mdistiller=/path/to/mdistiller \
      --data_dir=../shared/tfds [--pairs='resnet32x4>>resnet8x4,wrn_40_2>>wrn_16_2'] \
      [--methods=kd,dkd] [--images=2560] [--epochs=3] [--rounds=2] [--json=out.json]

Both train the same pair with the same method for `--epochs` epochs on the same
`--images` CIFAR-10 training images (CIFAR-100 is not available offline; its 100-class
head would only widen the last layer) and evaluate on a fifth as many test images after
each epoch, batch 64, the teacher from the same random weights. Rounds alternate: mdistiller, then kd_jax, `--rounds` times.

- mdistiller: its own `BaseTrainer.train_epoch` (mdistiller/engine/trainer.py: the
  train iterations, `validate`, the log and its checkpoints), its models and its
  distillers (KD, DKD) with its engine/cfg.py defaults and configs/cifar100 yaml, a
  torch DataLoader as its get_cifar100_dataloaders builds it (shuffle, NUM_WORKERS
  workers, test loader with 1 worker). Its CUDA calls (`.cuda()`) return the tensor.
  torchvision does not install with this torch here, so the augmentation is the same
  transforms written with torch (zero-pad 4 and random 32x32 crop, flip with p 0.5,
  to [0, 1] CHW, normalise), applied per example in the Dataset as torchvision would.
- kd_jax: `train.train_and_evaluate` with configs/cifar100_standard.py (input, jitted
  steps, evaluation, checkpoints), from a fresh run directory each round.
An epoch's time is wall time from its start to the next's (evaluation and checkpoint
included; kd_jax's from its result's epoch_end_wall_time_s); epoch 1 is excluded on both
sides (kd_jax compiles in it). Rates are training
images per second of that time, median over epochs and rounds; the ratio is kd_jax's
rate over mdistiller's.
"""
import contextlib
import functools
import importlib
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
import types

from absl import app, flags, logging
import numpy as np

FLAGS = flags.FLAGS
flags.DEFINE_string('mdistiller', None, 'a checkout of megvii-research/mdistiller')
flags.DEFINE_string('data_dir', None, 'a TFDS folder holding cifar10')
flags.DEFINE_list('pairs', ['resnet32x4>>resnet8x4', 'wrn_40_2>>wrn_16_2'], 'teacher>>student')
flags.DEFINE_list('methods', ['kd', 'dkd'], 'kd and/or dkd')
flags.DEFINE_integer('images', 2560, 'training images per epoch')
flags.DEFINE_integer('epochs', 3, 'epochs per round (the first is not timed)')
flags.DEFINE_integer('rounds', 2, 'alternations of mdistiller and kd_jax')
flags.DEFINE_integer('torch_threads', None, 'torch.set_num_threads (default: torch\'s)')
flags.DEFINE_string('json', None, 'also write the measurements here')

MDISTILLER_TYPES = {'kd': ('KD', 'configs/cifar100/kd.yaml'),
                    'dkd': ('DKD', 'configs/cifar100/dkd/res32x4_res8x4.yaml')}
MEAN, STD = (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)  # mdistiller's
NUM_CLASSES = 10


def _package(name, path, run_init):
  if name in sys.modules:
    return sys.modules[name]
  if run_init:
    spec = importlib.util.spec_from_file_location(name, os.path.join(path, '__init__.py'),
                                                  submodule_search_locations=[path])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
  else:
    module = importlib.util.module_from_spec(
        importlib.machinery.ModuleSpec(name, None, is_package=True))
    module.__path__ = [path]
    sys.modules[name] = module
  return module


class _NoSummaryWriter:
  def __init__(self, *args, **kwargs):
    pass

  def add_scalar(self, *args, **kwargs):
    pass

  def flush(self):
    pass


def import_mdistiller(root):
  """mdistiller's cifar models, distillers and engine as packages of their own (its
  top-level package imports torchvision datasets, which this benchmark does not use)."""
  pkg = os.path.join(os.path.abspath(root), 'mdistiller')
  if not os.path.isfile(os.path.join(pkg, 'engine', 'trainer.py')):
    raise ValueError(f'--mdistiller={root!r}: no mdistiller/engine/trainer.py there')
  if importlib.util.find_spec('tensorboardX') is None:
    sys.modules['tensorboardX'] = types.SimpleNamespace(SummaryWriter=_NoSummaryWriter)
  models = _package('md_models', os.path.join(pkg, 'models', 'cifar'), run_init=True)
  _package('md_distillers', os.path.join(pkg, 'distillers'), run_init=False)
  _package('md_engine', os.path.join(pkg, 'engine'), run_init=True)
  for name in ('md_engine.trainer', 'md_engine.utils'):  # no progress bars in the timing
    module = importlib.import_module(name)
    module.tqdm = functools.partial(module.tqdm, disable=True)
  return types.SimpleNamespace(
      models=models.cifar_model_dict, cfg=importlib.import_module('md_engine.cfg').CFG,
      trainer=importlib.import_module('md_engine.trainer').BaseTrainer,
      distillers={'KD': importlib.import_module('md_distillers.KD').KD,
                  'DKD': importlib.import_module('md_distillers.DKD').DKD},
      root=os.path.abspath(root))


@contextlib.contextmanager
def _cuda_is_cpu():
  import torch  # pylint: disable=g-import-not-at-top
  original = torch.Tensor.cuda
  torch.Tensor.cuda = lambda self, *args, **kwargs: self
  try:
    yield
  finally:
    torch.Tensor.cuda = original


def _torch_dataset(images, labels, train):
  import torch  # pylint: disable=g-import-not-at-top
  mean = torch.tensor(MEAN).view(3, 1, 1)
  std = torch.tensor(STD).view(3, 1, 1)

  class Cifar(torch.utils.data.Dataset):
    """(image, label, index) for training as CIFAR100Instance, (image, label) for test."""

    def __len__(self):
      return len(images)

    def __getitem__(self, index):
      x = torch.from_numpy(images[index]).permute(2, 0, 1)  # uint8 CHW
      if train:  # RandomCrop(32, padding=4), RandomHorizontalFlip()
        x = torch.nn.functional.pad(x, (4, 4, 4, 4))
        i, j = torch.randint(0, 9, (2,)).tolist()
        x = x[:, i:i + 32, j:j + 32]
        if torch.rand(1).item() < 0.5:
          x = x.flip(-1)
      x = (x.float() / 255 - mean) / std  # ToTensor(), Normalize()
      return (x, int(labels[index]), index) if train else (x, int(labels[index]))

  return Cifar()


def mdistiller_epochs(md, method, pair, teacher_state, data, epochs, workdir):
  """Seconds of each epoch of mdistiller's trainer."""
  import torch  # pylint: disable=g-import-not-at-top
  teacher_name, student_name = pair.split('>>')
  type_, yaml = MDISTILLER_TYPES[method]
  cfg = md.cfg.clone()
  cfg.merge_from_file(os.path.join(md.root, yaml))
  cfg.merge_from_list(['DISTILLER.TEACHER', teacher_name, 'DISTILLER.STUDENT', student_name,
                       'LOG.PREFIX', workdir, 'LOG.WANDB', False, 'SOLVER.EPOCHS', epochs])
  cfg.freeze()
  teacher = md.models[teacher_name][0](num_classes=NUM_CLASSES)
  teacher.load_state_dict(teacher_state)
  student = md.models[student_name][0](num_classes=NUM_CLASSES)
  distiller = torch.nn.DataParallel(md.distillers[type_](student, teacher, cfg))
  train_loader = torch.utils.data.DataLoader(
      _torch_dataset(*data['train'], train=True), batch_size=cfg.SOLVER.BATCH_SIZE,
      shuffle=True, num_workers=cfg.DATASET.NUM_WORKERS)
  test_loader = torch.utils.data.DataLoader(
      _torch_dataset(*data['test'], train=False), batch_size=cfg.DATASET.TEST.BATCH_SIZE,
      shuffle=False, num_workers=1)
  trainer = md.trainer('bench', distiller, train_loader, test_loader, cfg)
  ends = [time.perf_counter()]
  with _cuda_is_cpu():
    for epoch in range(1, epochs + 1):
      trainer.train_epoch(epoch)
      ends.append(time.perf_counter())
  return list(np.diff(ends))


def kd_jax_epochs(method, pair, teacher_pth, data_dir, images, epochs, workdir):
  """Seconds of each epoch of kd_jax's training loop (from its result's history)."""
  from configs import cifar100_standard  # pylint: disable=g-import-not-at-top
  from kd_jax import train  # pylint: disable=g-import-not-at-top
  config = cifar100_standard.get_config(f'method={method},pair={pair},dataset=cifar10')
  config.train_split, config.eval_split = f'train[:{images}]', f'test[:{images // 5}]'
  config.num_epochs, config.lr_boundaries = epochs, (epochs,)
  config.image_mean, config.image_std = MEAN, STD
  config.data_dir, config.teacher.checkpoint = data_dir, teacher_pth
  result = train.train_and_evaluate(config, workdir)
  ends = [0.0] + result['epoch_end_wall_time_s']
  return list(np.diff(ends))


def main(argv):
  del argv
  import torch  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from kd_jax import models, torch_import  # pylint: disable=g-import-not-at-top
  if FLAGS.torch_threads:
    torch.set_num_threads(FLAGS.torch_threads)
  md = import_mdistiller(FLAGS.mdistiller)
  for method in FLAGS.methods:
    if method not in MDISTILLER_TYPES:
      raise app.UsageError(f'--methods: {method!r} is not one of {sorted(MDISTILLER_TYPES)}')
  if FLAGS.epochs < 2:
    raise app.UsageError(f'--epochs={FLAGS.epochs}: the first is not timed; give >= 2')
  split = lambda s: tfds.as_numpy(tfds.load('cifar10', split=s, batch_size=-1,
                                            data_dir=FLAGS.data_dir))
  train_split, test_split = split(f'train[:{FLAGS.images}]'), split(f'test[:{FLAGS.images // 5}]')
  data = {'train': (train_split['image'], train_split['label']),
          'test': (test_split['image'], test_split['label'])}
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    for pair in FLAGS.pairs:
      teacher_name = pair.split('>>')[0]
      teacher_model = models.create_model(teacher_name, NUM_CLASSES)
      state = torch_import.flax_to_torch(
          models.init_variables(teacher_model, jax.random.key(0)), teacher_model)
      state = {k: torch.from_numpy(np.array(v)) for k, v in state.items()}
      teacher_pth = os.path.join(tmp, f'{teacher_name}.pth')
      torch.save({'model': state}, teacher_pth)
      for method in FLAGS.methods:
        times = {'mdistiller': [], 'kd_jax': []}
        for r in range(FLAGS.rounds):
          run_dir = os.path.join(tmp, f'{method}_{r}')
          times['mdistiller'] += mdistiller_epochs(md, method, pair, state, data, FLAGS.epochs,
                                                   os.path.join(run_dir, 'md'))[1:]
          times['kd_jax'] += kd_jax_epochs(method, pair, teacher_pth, FLAGS.data_dir,
                                           FLAGS.images, FLAGS.epochs,
                                           os.path.join(run_dir, 'kd_jax'))[1:]
        row = {'method': method, 'pair': pair, 'images': FLAGS.images, 'batch': 64,
               'epoch_s': times,
               **{f'{k}_img_s': FLAGS.images / statistics.median(v) for k, v in times.items()}}
        row['ratio'] = row['kd_jax_img_s'] / row['mdistiller_img_s']
        rows.append(row)
        print(json.dumps(row), flush=True)
  env = {'torch': torch.__version__, 'torch_threads': torch.get_num_threads(),
         'jax': jax.__version__, 'device': jax.devices()[0].device_kind,
         'cpu_count': os.cpu_count()}
  lines = ['| method | pair | mdistiller img/s | kd_jax img/s | kd_jax / mdistiller |',
           '|---|---|---|---|---|']
  lines += [f"| {r['method']} | {r['pair']} | {r['mdistiller_img_s']:.0f} | "
            f"{r['kd_jax_img_s']:.0f} | {r['ratio']:.2f} |" for r in rows]
  lines.append(f"\nend to end, {FLAGS.images} train + {FLAGS.images // 5} test images per "
               f"epoch, batch 64, median of {FLAGS.rounds} x {FLAGS.epochs - 1} epochs; {env}")
  print('\n'.join(lines))
  if FLAGS.json:
    with open(FLAGS.json, 'w') as f:
      json.dump({'rows': rows, 'environment': env}, f, indent=2)


if __name__ == '__main__':
  flags.mark_flags_as_required(['mdistiller', 'data_dir'])
  logging.set_verbosity(logging.WARNING)
  app.run(main)
