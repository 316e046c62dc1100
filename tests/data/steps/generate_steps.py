#!/usr/bin/env python3
"""Golden vectors for two real SGD steps of four mdistiller methods (FitNet, CRD,
ReviewKD, DKD), made by mdistiller's own training code.

  pip install torch numpy yacs      # yacs (and its pyyaml) read mdistiller's configs
  python tests/data/steps/generate_steps.py --mdistiller /path/to/mdistiller \
      --out tests/data/steps --seed 0 --batch 8

Nothing of mdistiller is copied here: its files are imported from the checkout given
with --mdistiller (`mdistiller/models/cifar`, `mdistiller/distillers`, `mdistiller/engine`
as packages of their own, so mdistiller's top-level package and its dataset module,
which needs torchvision, are not imported). What runs is mdistiller's code:

- the configuration: `engine/cfg.py`'s CFG, merged with the method's CIFAR-100 yaml
  (configs/cifar100/...) and a few overrides that fit the small pair (see OVERRIDES);
- the models (`models/cifar/resnet.py`) and the distiller class, built as
  tools/train.py builds them, wrapped in torch.nn.DataParallel (tools/train.py:78; on a
  machine without CUDA DataParallel is a pass-through with no device ids);
- the trainer (`engine/trainer.py`: BaseTrainer, or CRDTrainer for CRD as crd.yaml's
  SOLVER.TRAINER says), constructed with its own __init__ (so the optimizer is its
  init_optimizer), `adjust_learning_rate` and `distiller.train()` as `train_epoch` calls
  them, then `train_iter` twice, unchanged.

Three things are patched while that code runs, all to run mdistiller's CUDA float32
code on a CPU in float64 and none touching what is computed:
- `torch.Tensor.cuda` returns the tensor itself (train_iter moves the batch with
  .cuda(non_blocking=True); ContrastMemory moves its AliasMethod table with .cuda());
- `torch.Tensor.float` returns a float64 tensor unchanged (train_iter does
  `image = image.float()`, which would cast the float64 batch to float32 for a float64
  model); other dtypes are cast as before (accuracy() casts bools);
- `tensorboardX` is replaced by a stub when it is not installed (the trainer only
  constructs a SummaryWriter in __init__; its log directory goes to a temporary folder
  that is deleted afterwards). wandb is never imported (log() is not called).

The loss dict of each step is read by wrapping the distiller's `forward_train` (the
wrapper calls the original and keeps a detached copy of what it returns).

File format, choices and mdistiller's training procedure: README.md next to this file.
"""
import argparse
import contextlib
import hashlib
import importlib
import importlib.machinery
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import types
import warnings

import numpy as np
import torch

_ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..', '..'))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)
from tests.golden import images, state_dict_values  # noqa: E402

warnings.filterwarnings('ignore', category=UserWarning)   # kl_div(size_average=...) etc.
warnings.filterwarnings('ignore', category=FutureWarning)

FORMAT_VERSION = 1
NUM_CLASSES = 100
TEACHER, STUDENT = 'resnet20', 'resnet8'
METHODS = ('fitnet', 'crd', 'reviewkd', 'dkd')

# method -> (distiller type, config yaml under the checkout, overrides (yacs list)).
# The yaml files are the ones for resnet32x4 >> resnet8x4 (fitnet, crd, reviewkd) and
# resnet56 >> resnet20 (dkd); the overrides swap in the small pair and what depends on
# its widths (CRD's feature dims, ReviewKD's channel lists) and shrink CRD's memory.
CONFIGS = {
    'fitnet': ('FITNET', 'configs/cifar100/fitnet.yaml', []),
    'crd': ('CRD', 'configs/cifar100/crd.yaml', [
        'CRD.FEAT.STUDENT_DIM', 64, 'CRD.FEAT.TEACHER_DIM', 64]),  # NCE.K: --nce_k
    'reviewkd': ('REVIEWKD', 'configs/cifar100/reviewkd.yaml', [
        'REVIEWKD.IN_CHANNELS', [16, 32, 64, 64], 'REVIEWKD.OUT_CHANNELS', [16, 32, 64, 64],
        'REVIEWKD.SHAPES', [1, 8, 16, 32], 'REVIEWKD.OUT_SHAPES', [1, 8, 16, 32]]),
    'dkd': ('DKD', 'configs/cifar100/dkd/res56_res20.yaml', []),
}
DISTILLER_FILES = {'FITNET': 'FitNet', 'CRD': 'CRD', 'REVIEWKD': 'ReviewKD', 'DKD': 'DKD'}


# ---------------------------------------------------------------------------------------
# Importing mdistiller's files.

def _package(name, path, run_init):
  """Registers `name` as a package at `path`; runs its __init__.py only if run_init."""
  if name in sys.modules:
    return sys.modules[name]
  init = os.path.join(path, '__init__.py')
  if run_init:
    spec = importlib.util.spec_from_file_location(name, init, submodule_search_locations=[path])
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
  else:
    spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
    mod = importlib.util.module_from_spec(spec)
    mod.__path__ = [path]
    sys.modules[name] = mod
  return mod


def _sha256(path):
  with open(path, 'rb') as f:
    return hashlib.sha256(f.read()).hexdigest()


class _StubSummaryWriter:
  def __init__(self, *args, **kwargs):
    pass

  def add_scalar(self, *args, **kwargs):
    pass

  def flush(self):
    pass


class Mdistiller:
  """mdistiller's modules, imported from a checkout, and the files they came from."""

  def __init__(self, root):
    root = os.path.abspath(root)
    pkg = os.path.join(root, 'mdistiller')
    if not os.path.isfile(os.path.join(pkg, 'engine', 'trainer.py')):
      raise SystemExit(f'--mdistiller {root}: no mdistiller/engine/trainer.py there')
    self.root = root
    tbx = sys.modules.get('tensorboardX')
    if tbx is None and importlib.util.find_spec('tensorboardX') is None:
      tbx = types.ModuleType('tensorboardX')
      tbx.SummaryWriter = _StubSummaryWriter
      sys.modules['tensorboardX'] = tbx
    self.tensorboardx = 'stub' if tbx is not None and tbx.SummaryWriter is _StubSummaryWriter \
        else 'installed'
    _package('md_models', os.path.join(pkg, 'models', 'cifar'), run_init=False)
    _package('md_distillers', os.path.join(pkg, 'distillers'), run_init=False)
    self.engine = _package('md_engine', os.path.join(pkg, 'engine'), run_init=True)
    self.cfg = importlib.import_module('md_engine.cfg')
    self.utils = importlib.import_module('md_engine.utils')
    self.resnet = importlib.import_module('md_models.resnet')
    self.files = {}
    for rel in ('mdistiller/engine/__init__.py', 'mdistiller/engine/trainer.py',
                'mdistiller/engine/utils.py', 'mdistiller/engine/cfg.py',
                'mdistiller/models/cifar/resnet.py', 'mdistiller/distillers/_base.py',
                'mdistiller/distillers/_common.py'):
      self.files[rel] = _sha256(os.path.join(root, rel))

  def distiller_class(self, type_):
    stem = DISTILLER_FILES[type_]
    self.files[f'mdistiller/distillers/{stem}.py'] = _sha256(
        os.path.join(self.root, 'mdistiller', 'distillers', stem + '.py'))
    return getattr(importlib.import_module(f'md_distillers.{stem}'), stem)

  def config(self, method, overrides, log_prefix):
    type_, yaml_rel, extra = CONFIGS[method]
    self.files[yaml_rel] = _sha256(os.path.join(self.root, yaml_rel))
    cfg = self.cfg.CFG.clone()
    cfg.merge_from_file(os.path.join(self.root, yaml_rel))
    opts = ['DISTILLER.TEACHER', TEACHER, 'DISTILLER.STUDENT', STUDENT] + list(extra)
    opts += list(overrides) + ['LOG.PREFIX', log_prefix, 'LOG.WANDB', False]
    cfg.merge_from_list(opts)
    cfg.freeze()
    assert cfg.DISTILLER.TYPE == type_, (cfg.DISTILLER.TYPE, type_)
    return cfg, yaml_rel, opts


@contextlib.contextmanager
def cpu_float64():
  """mdistiller's CUDA/float32 code on a CPU in float64 (see the module docstring)."""
  orig_cuda, orig_float = torch.Tensor.cuda, torch.Tensor.float

  def cuda(self, *args, **kwargs):
    return self

  def to_float(self, *args, **kwargs):
    if self.dtype == torch.float64:
      return self
    return orig_float(self, *args, **kwargs)

  torch.Tensor.cuda, torch.Tensor.float = cuda, to_float
  try:
    yield
  finally:
    torch.Tensor.cuda, torch.Tensor.float = orig_cuda, orig_float


# ---------------------------------------------------------------------------------------
# Data: two batches of a small synthetic "dataset" of n_data examples.

def make_data(seed, batch, n_data, nce_k):
  """Images, labels, dataset indices and CRD's contrast indices of two batches.

  The dataset has n_data examples with labels U{0..99} (rng seed + 5); the two batches
  are the first 2 * batch of one permutation of it (one epoch of a shuffled loader: no
  index twice). Images: tests.golden.images(seed + 3, batch) and (seed + 4, batch).
  Contrast indices as mdistiller's CIFAR100InstanceSample draws them in "exact" mode
  (mdistiller/dataset/cifar100.py:56-72, 101-114): column 0 the example's own index,
  then nce_k negatives drawn with np.random.choice from the indices of the examples of
  all other classes (class by class, each in index order), without replacement unless
  nce_k exceeds their number, here from np.random.RandomState(seed + 6), example by
  example, batch 1 then batch 2.
  """
  if 2 * batch > n_data:
    raise SystemExit(f'--batch {batch}: two batches need 2 * batch <= --n_data {n_data}')
  rng = np.random.default_rng(seed + 5)
  labels = rng.integers(0, NUM_CLASSES, n_data).astype(np.int64)
  perm = rng.permutation(n_data).astype(np.int64)
  index = [perm[:batch], perm[batch:2 * batch]]
  cls_positive = [[] for _ in range(NUM_CLASSES)]
  for i in range(n_data):
    cls_positive[labels[i]].append(i)
  cls_negative = [[] for _ in range(NUM_CLASSES)]
  for i in range(NUM_CLASSES):
    for j in range(NUM_CLASSES):
      if j != i:
        cls_negative[i].extend(cls_positive[j])
  cls_negative = [np.asarray(c, np.int64) for c in cls_negative]
  sampler = np.random.RandomState(seed + 6)
  contrast = []
  for idx in index:
    rows = []
    for i in idx:
      neg = cls_negative[labels[i]]
      replace = nce_k > len(neg)
      rows.append(np.hstack([[i], sampler.choice(neg, nce_k, replace=replace)]))
    contrast.append(np.asarray(rows, np.int64))
  xs = [images(seed + 3, batch), images(seed + 4, batch)]
  ys = [labels[i] for i in index]
  return xs, ys, index, contrast, labels


def _nchw(x):
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).double()


def _f32(t):
  a = t.detach().cpu().numpy()
  return a.astype(np.float32) if a.dtype.kind == 'f' else a


# ---------------------------------------------------------------------------------------

def generate(md, method, args, log_prefix):
  type_, yaml_rel, _ = CONFIGS[method]
  overrides = ['CRD.NCE.K', args.nce_k] if method == 'crd' else []
  cfg, yaml_rel, opts = md.config(method, overrides, log_prefix)
  seed_t, seed_s, seed_c = args.seed, args.seed + 1, args.seed + 2
  torch.manual_seed(args.seed)  # the originals' own random inits, all overwritten below

  with cpu_float64():
    # tools/train.py:61-77 (the teacher's checkpoint is replaced by seeded weights).
    teacher = getattr(md.resnet, TEACHER)(num_classes=NUM_CLASSES)
    student = getattr(md.resnet, STUDENT)(num_classes=NUM_CLASSES)
    cls = md.distiller_class(type_)
    if type_ == 'CRD':
      distiller = cls(student, teacher, cfg, args.n_data)
    else:
      distiller = cls(student, teacher, cfg)

    # Seeded weights: teacher (seed), student (seed + 1), the distiller's own entries
    # (seed + 2), each in state_dict() order. CRD's `contrast.params` buffer
    # ([K, T, Z_v1=-1, Z_v2=-1, momentum]) is configuration, not weights: kept.
    full = distiller.state_dict()
    t_entries = [(k, list(v.shape)) for k, v in teacher.state_dict().items()]
    s_entries = [(k, list(v.shape)) for k, v in student.state_dict().items()]
    c_entries = [(k, list(v.shape)) for k, v in full.items()
                 if not k.startswith(('student.', 'teacher.')) and k != 'contrast.params']
    values = {}
    values.update({'teacher.' + k: v for k, v in state_dict_values(seed_t, t_entries).items()})
    values.update({'student.' + k: v for k, v in state_dict_values(seed_s, s_entries).items()})
    values.update(state_dict_values(seed_c, c_entries))
    if 'contrast.params' in full:
      values['contrast.params'] = full['contrast.params'].numpy()
    assert set(values) == set(full), set(values) ^ set(full)
    distiller.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in values.items()},
                              strict=True)
    distiller.double()
    dp = torch.nn.DataParallel(distiller)  # tools/train.py:78 (no devices: pass-through)
    trainer = md.engine.trainer_dict[cfg.SOLVER.TRAINER](
        'golden_steps', dp, None, None, cfg)

    # Which parameters the optimizer holds, by name (one param group).
    names = {id(p): n for n, p in distiller.named_parameters()}
    groups = trainer.optimizer.param_groups
    assert len(groups) == 1
    learnable = [names[id(p)] for p in groups[0]['params']]
    hyper = {k: groups[0][k] for k in ('lr', 'momentum', 'dampening', 'weight_decay',
                                       'nesterov', 'maximize')}

    captured = {}
    forward_train = distiller.forward_train

    def recording_forward_train(**kwargs):
      preds, losses = forward_train(**kwargs)
      captured['losses'] = {k: v.detach().clone() for k, v in losses.items()}
      captured['kwargs'] = sorted(kwargs)
      return preds, losses

    distiller.forward_train = recording_forward_train

    xs, ys, index, contrast, labels = make_data(args.seed, args.batch, args.n_data, args.nce_k)
    out = {}
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    extra_keys = [k for k, _ in c_entries if not k.startswith('contrast.')]

    # trainer.py:93 and :105, once for the epoch (both steps are in the same epoch).
    lr = md.utils.adjust_learning_rate(args.epoch, cfg, trainer.optimizer)
    dp.train()
    modes = {
        'distiller': distiller.training, 'student': student.training,
        'teacher': teacher.training,
        'student_modules_in_train_mode': all(m.training for m in student.modules()),
        'teacher_modules_in_eval_mode': all(not m.training for m in teacher.modules()),
        'extra_modules_in_train_mode': all(
            sub.training for name, child in distiller.named_children()
            if name not in ('student', 'teacher') for sub in child.modules()),
    }
    assert modes['student_modules_in_train_mode'] and modes['teacher_modules_in_eval_mode']
    assert modes['extra_modules_in_train_mode']

    for step in (1, 2):
      x = _nchw(xs[step - 1])
      y = torch.from_numpy(ys[step - 1])
      idx = torch.from_numpy(index[step - 1])
      if type_ == 'CRD':
        for name in ('memory_v1', 'memory_v2'):
          out[f'crd/{name}_before{step}'] = _f32(getattr(distiller.contrast, name))
        out[f'crd/params_before{step}'] = distiller.contrast.params.detach().numpy().copy()
        data = (x, y, idx, torch.from_numpy(contrast[step - 1]))
      else:
        data = (x, y, idx)
      meters = {k: md.utils.AverageMeter() for k in
                ('training_time', 'data_time', 'losses', 'top1', 'top5')}
      trainer.train_iter(data, args.epoch, meters)  # trainer.py:153-186 / 190-226
      for k, v in captured['losses'].items():
        out[f'loss{step}/{k}'] = np.float64(v.mean().item())
      out[f'loss_total{step}'] = np.float64(meters['losses'].val)
      for k, v in student.state_dict().items():
        out[f'student{step}/{k}'] = _f32(v)
      state = distiller.state_dict()
      for k in extra_keys:
        out[f'connector{step}/{k}'] = _f32(state[k])
      if type_ == 'CRD':
        for name in ('memory_v1', 'memory_v2'):
          out[f'crd/{name}_after{step}'] = _f32(getattr(distiller.contrast, name))
        out[f'crd/params_after{step}'] = distiller.contrast.params.detach().numpy().copy()
        out[f'crd/contrast_idx{step}'] = contrast[step - 1]
        out[f'index{step}'] = index[step - 1]

    for k, v in teacher.state_dict().items():
      assert torch.equal(v, teacher_before[k]), f'teacher entry {k} changed'
    assert dp.training and not teacher.training

  terms = sorted(captured['losses'])
  for step in (1, 2):
    total = sum(out[f'loss{step}/{k}'] for k in captured['losses'])
    assert abs(total - out[f'loss_total{step}']) <= 1e-12 * abs(total), (total, step)
  for step in (1, 2):
    out[f'x{step}'] = xs[step - 1]
    out[f'y{step}'] = ys[step - 1]

  section = cfg.get(type_)
  spec = {
      'format_version': FORMAT_VERSION,
      'method': method,
      'distiller': f'mdistiller.distillers.{DISTILLER_FILES[type_]}.{DISTILLER_FILES[type_]}',
      'trainer': type(trainer).__name__,
      'config_file': yaml_rel,
      'config_overrides': [[k, v] for k, v in zip(opts[::2], opts[1::2])
                           if not k.startswith('LOG.')],
      'method_config': json.loads(json.dumps(section, default=lambda o: dict(o))),
      'pair': {'teacher': TEACHER, 'student': STUDENT, 'num_classes': NUM_CLASSES},
      'seeds': {'teacher': seed_t, 'student': seed_s, 'connectors': seed_c,
                'x1': args.seed + 3, 'x2': args.seed + 4, 'labels_and_order': args.seed + 5,
                'contrast_idx': args.seed + 6},
      'entries': {'teacher': t_entries, 'student': s_entries, 'connectors': c_entries},
      'learnable_parameters': learnable,
      'lr': lr, 'momentum': hyper['momentum'], 'weight_decay': hyper['weight_decay'],
      'dampening': hyper['dampening'], 'nesterov': hyper['nesterov'],
      'lr_schedule': {'base_lr': cfg.SOLVER.LR, 'decay_stages': list(cfg.SOLVER.LR_DECAY_STAGES),
                      'decay_rate': cfg.SOLVER.LR_DECAY_RATE, 'epochs': cfg.SOLVER.EPOCHS,
                      'batch_size': cfg.SOLVER.BATCH_SIZE},
      'epoch': args.epoch,
      'epoch_reaches_forward_train': 'epoch' in captured['kwargs'],
      'forward_train_kwargs': captured['kwargs'],
      'batch': args.batch,
      'loss_terms': terms,
      'modes': modes,
      'dtype': 'float64 (distiller.double()); float arrays stored as float32',
      'torch': torch.__version__, 'numpy': np.__version__,
      'tensorboardX': md.tensorboardx,
      'source_sha256': dict(sorted(md.files.items())),
      'keys': KEY_DOC,
  }
  if type_ == 'CRD':
    spec['crd'] = {'n_data': args.n_data, 'nce_k': args.nce_k, 'feat_dim': cfg.CRD.FEAT.DIM,
                   'nce_t': cfg.CRD.NCE.TEMPERATURE, 'nce_momentum': cfg.CRD.NCE.MOMENTUM,
                   'mode': cfg.CRD.MODE, 'dataset_labels': labels.tolist(),
                   'params_layout': '[K, T, Z_v1, Z_v2, momentum]; Z < 0 means unset'}
  if type_ in ('DKD', 'REVIEWKD'):
    warm = section.WARMUP if type_ == 'DKD' else section.WARMUP_EPOCHS
    spec['warmup_factor'] = min(args.epoch / warm, 1.0)
  out['spec'] = np.asarray(json.dumps(spec))
  path = os.path.join(args.out, f'step_{method}.npz')
  np.savez_compressed(path, **out)
  return path, {k: float(v) for k, v in out.items() if k.startswith(('loss1/', 'loss2/', 'loss_total'))}


KEY_DOC = {
    'spec': 'this JSON',
    'x1, x2': 'the two input batches, float32 NHWC [B,32,32,3] (tests.golden.images); '
              'mdistiller gets them as NCHW float64, no augmentation',
    'y1, y2': 'labels, int64 [B]',
    'index1, index2': 'CRD only: the examples\' indices in the n_data-example dataset, int64 [B]',
    'loss1/<term>, loss2/<term>': 'float64 scalars: each entry of the loss dict that '
                                  'forward_train returned at step 1 / step 2, before that '
                                  'step\'s update (l.mean() of it, as trainer.py:167 sums)',
    'loss_total1, loss_total2': 'float64: the loss the trainer backpropagated, '
                                'sum([l.mean() for l in losses_dict.values()])',
    'student1/<key>, student2/<key>': 'the student\'s full state_dict after step 1 / 2 '
                                      '(running statistics and num_batches_tracked included)',
    'connector1/<key>, connector2/<key>': 'the distiller\'s own learnable modules\' '
                                          'state_dict entries (key as in distiller.state_dict(); '
                                          'CRD\'s memory is under crd/) after step 1 / 2; '
                                          'none for DKD',
    'crd/contrast_idx1, crd/contrast_idx2': 'int64 [B, K+1]: column 0 the example\'s own '
                                            'index, then K negatives (data, not sampled by the model)',
    'crd/memory_v1_before<s>, crd/memory_v1_after<s>, crd/memory_v2_...': 'the memory banks '
        '[n_data, feat_dim] before and after step s (before2 == after1)',
    'crd/params_before<s>, crd/params_after<s>': 'float64 [5]: ContrastMemory.params '
        '[K, T, Z_v1, Z_v2, momentum]; Z_v1, Z_v2 are set during step 1 and then fixed',
}


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--mdistiller', required=True, help='a checkout of megvii-research/mdistiller')
  p.add_argument('--out', required=True)
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--batch', type=int, default=8)
  p.add_argument('--epoch', type=int, default=5,
                 help='the (1-based) epoch the two steps belong to (default 5: inside '
                      'the 20-epoch warm-up of DKD and ReviewKD)')
  p.add_argument('--n_data', type=int, default=64, help='CRD: dataset size (memory rows)')
  p.add_argument('--nce_k', type=int, default=16, help='CRD: negatives per example')
  p.add_argument('--methods', default=','.join(METHODS))
  args = p.parse_args()
  methods = [m for m in args.methods.split(',') if m]
  for m in methods:
    if m not in METHODS:
      raise SystemExit(f'--methods: unknown {m!r}; known: {", ".join(METHODS)}')
  if args.batch < 2:
    raise SystemExit('--batch must be >= 2 (train-mode BatchNorm on the 1x1 level)')
  os.makedirs(args.out, exist_ok=True)
  torch.set_num_threads(max(1, os.cpu_count() or 1))
  md = Mdistiller(args.mdistiller)
  log_prefix = tempfile.mkdtemp(prefix='golden_steps_log_')
  try:
    for m in methods:
      path, losses = generate(md, m, args, log_prefix)
      print(f'{path}: {os.path.getsize(path)} bytes')
      for k, v in losses.items():
        print(f'  {k} = {v:.17g}')
  finally:
    shutil.rmtree(log_prefix, ignore_errors=True)


if __name__ == '__main__':
  main()
