"""Golden vectors for the distillation methods' loss terms, made by the original PyTorch code.

Runs the loss code of the original repositories (imported from the paths given on the
command line, never copied here) on random features with the shapes of real CIFAR-100
teacher >> student pairs, and writes one .npz per (method[, variant], pair) to --out:

  python tests/data/methods/generate_losses.py \
      --mdistiller /work/refs/mdistiller --repdistiller /work/refs/RepDistiller \
      --dist_kd /work/refs/DIST_KD --logit_std /work/refs/logit-std \
      --out tests/data/methods --seed 0 --batch 8

--dist_kd is a DIST_KD checkout whose `classification` submodule
(hunto/image_classification_sota) is checked out, or a checkout of
image_classification_sota itself (the DIST loss with its temperature lives there, in
lib/models/losses/dist_kd.py; DIST_KD's own segmentation/losses/dist_kd.py has no tau).

Needs torch, numpy, scipy (mdistiller's OFD imports scipy.stats), yacs and pyyaml
(mdistiller's configuration files). The file format and the methods are described in
README.md next to this script.
"""
import argparse
import contextlib
import copy
import hashlib
import importlib
import importlib.machinery
import importlib.util
import json
import math
import os
import sys
import warnings

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

_ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), '..', '..', '..'))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)
from tests.golden import state_dict_values  # noqa: E402

warnings.filterwarnings('ignore', category=UserWarning)
warnings.filterwarnings('ignore', category=FutureWarning)
torch.set_num_threads(max(1, os.cpu_count() or 1))

NUM_CLASSES = 100
# Above this many elements a weight gradient is stored as its first n slices along dim 0
# (`grad/weights_slice/<key>` = gradient[:n], n = the most that keep n * prod(shape[1:])
# within the limit, at least 1; n in the spec's `weight_grad_slices`).
MAX_STORED_WEIGHT_GRAD = 65536

# ---------------------------------------------------------------------------------------
# Importing the originals' files without their packages' __init__ (which pull in data
# loaders, wandb, checkpoints...).


def _bare_package(name, path):
  if name in sys.modules:
    return sys.modules[name]
  spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
  mod = importlib.util.module_from_spec(spec)
  mod.__path__ = [path]
  sys.modules[name] = mod
  return mod


def _load_file(name, path):
  spec = importlib.util.spec_from_file_location(name, path)
  mod = importlib.util.module_from_spec(spec)
  sys.modules[name] = mod
  spec.loader.exec_module(mod)
  return mod


def _sha256(path):
  with open(path, 'rb') as f:
    return hashlib.sha256(f.read()).hexdigest()


class Sources:
  """The originals' modules, and where each came from."""

  def __init__(self, args):
    self.paths = {}
    md = os.path.abspath(args.mdistiller)
    _bare_package('md_distillers', os.path.join(md, 'mdistiller', 'distillers'))
    _bare_package('md_models', os.path.join(md, 'mdistiller', 'models', 'cifar'))
    _bare_package('md_engine', os.path.join(md, 'mdistiller', 'engine'))
    self.md_root = md
    ls = os.path.abspath(args.logit_std)
    _bare_package('ls_distillers', os.path.join(ls, 'mdistiller', 'distillers'))
    _bare_package('ls_engine', os.path.join(ls, 'mdistiller', 'engine'))
    self.ls_root = ls
    rd = os.path.abspath(args.repdistiller)
    _bare_package('rd_zoo', os.path.join(rd, 'distiller_zoo'))
    _bare_package('rd_models', os.path.join(rd, 'models'))
    self.rd_root = rd
    dk = os.path.abspath(args.dist_kd)
    candidates = [os.path.join(dk, 'classification'), dk]
    self.dist_root = None
    for c in candidates:
      if os.path.exists(os.path.join(c, 'lib', 'models', 'losses', 'dist_kd.py')):
        self.dist_root = c
        break
    if self.dist_root is None:
      raise SystemExit(
          f'--dist_kd {dk}: no classification/lib/models/losses/dist_kd.py (DIST_KD\'s '
          '`classification` submodule, hunto/image_classification_sota, is not checked '
          'out) and no lib/models/losses/dist_kd.py; point --dist_kd at a checkout of '
          'image_classification_sota')

  def md(self, mod):
    return self._track('mdistiller', self.md_root, 'md_distillers', 'mdistiller/distillers', mod)

  def ls(self, mod):
    return self._track('logit-standardization-KD', self.ls_root, 'ls_distillers',
                       'mdistiller/distillers', mod)

  def rd(self, mod):
    return self._track('RepDistiller', self.rd_root, 'rd_zoo', 'distiller_zoo', mod)

  def rd_models_util(self):
    return self._track('RepDistiller', self.rd_root, 'rd_models', 'models', 'util')

  def md_model(self, mod):
    return self._track('mdistiller', self.md_root, 'md_models', 'mdistiller/models/cifar', mod)

  def rd_model(self, mod):
    return self._track('RepDistiller', self.rd_root, 'rd_models', 'models', mod)

  def dist(self):
    path = os.path.join(self.dist_root, 'lib', 'models', 'losses', 'dist_kd.py')
    rel = 'lib/models/losses/dist_kd.py'
    if os.path.basename(self.dist_root) == 'classification':
      rel = 'classification/' + rel
    self.paths[('image_classification_sota (DIST_KD classification)', rel)] = _sha256(path)
    if 'dist_kd_mod' not in sys.modules:
      _load_file('dist_kd_mod', path)
    return sys.modules['dist_kd_mod']

  def dist_cifar_config(self):
    path = os.path.join(self.dist_root, 'configs', 'strategies', 'distill', 'dist_cifar.yaml')
    import yaml
    if not os.path.exists(path):
      return None
    with open(path) as f:
      return yaml.safe_load(f)

  def _track(self, repo, root, pkg, sub, mod):
    path = os.path.join(root, sub, mod + '.py')
    self.paths[(repo, sub + '/' + mod + '.py')] = _sha256(path)
    return importlib.import_module(pkg + '.' + mod)

  def md_cfg(self, yaml_rel=None):
    cfg_mod = self._track('mdistiller', self.md_root, 'md_engine', 'mdistiller/engine', 'cfg')
    cfg = cfg_mod.CFG.clone()
    if yaml_rel:
      cfg.merge_from_file(os.path.join(self.md_root, yaml_rel))
      self.paths[('mdistiller', yaml_rel)] = _sha256(os.path.join(self.md_root, yaml_rel))
    return cfg

  def ls_cfg(self, yaml_rel=None):
    cfg_mod = self._track('logit-standardization-KD', self.ls_root, 'ls_engine',
                          'mdistiller/engine', 'cfg')
    cfg = cfg_mod.CFG.clone()
    if yaml_rel:
      cfg.merge_from_file(os.path.join(self.ls_root, yaml_rel))
      self.paths[('logit-standardization-KD', yaml_rel)] = _sha256(
          os.path.join(self.ls_root, yaml_rel))
    return cfg


# ---------------------------------------------------------------------------------------
# Pairs, shapes and features.

PAIRS = {
    'resnet32x4__resnet8x4': ('resnet32x4', 'resnet8x4'),
    'wrn_40_2__ShuffleV1': ('wrn_40_2', 'ShuffleV1'),
}
MODEL_BUILDERS = {  # mdistiller file, function, feature convention
    'resnet32x4': ('resnet', 'resnet32x4', 'post_relu'),
    'resnet8x4': ('resnet', 'resnet8x4', 'post_relu'),
    'wrn_40_2': ('wrn', 'wrn_40_2', 'wrn'),
    'ShuffleV1': ('ShuffleNetv1', 'ShuffleV1', 'post_relu'),
}
STAGES = (1, 2, 3)


def model_shapes(src, name):
  """Runs the mdistiller model once on a 1-image batch; per-sample NCHW shapes."""
  file, fn, _ = MODEL_BUILDERS[name]
  mod = src.md_model(file)
  torch.manual_seed(0)
  net = getattr(mod, fn)(num_classes=NUM_CLASSES)
  net.eval()
  with torch.no_grad():
    logits, feats = net(torch.randn(1, 3, 32, 32))
  shapes = {'logits': tuple(logits.shape[1:]), 'pooled': tuple(feats['pooled_feat'].shape[1:]),
            'stem': tuple(feats['feats'][0].shape[1:])}
  for i in STAGES:
    shapes[f'stage{i}'] = tuple(feats['feats'][i].shape[1:])
    shapes[f'preact_stage{i}'] = tuple(feats['preact_feats'][i].shape[1:])
  stage_channels = getattr(net, 'stage_channels', None)
  if stage_channels is None:  # mdistiller's ShuffleV1 has no get_stage_channels
    stage_channels = [shapes['stem'][0]] + [shapes[f'stage{i}'][0] for i in STAGES]
  bn_channels = None
  try:
    bn_channels = [bn.num_features for bn in net.get_bn_before_relu()]
  except NotImplementedError:
    pass
  return shapes, list(stage_channels), bn_channels


def rd_model_check(src, name, shapes):
  """RepDistiller's copy of the model gives the same feature list shapes (is_feat=True)."""
  file, fn, _ = MODEL_BUILDERS[name]
  mod = src.rd_model(file)
  torch.manual_seed(0)
  net = getattr(mod, fn)(num_classes=NUM_CLASSES)
  net.eval()
  with torch.no_grad():
    feat, _ = net(torch.randn(1, 3, 32, 32), is_feat=True)
    feat_pre, _ = net(torch.randn(1, 3, 32, 32), is_feat=True, preact=True)
  got = [tuple(f.shape[1:]) for f in feat]
  want = [shapes['stem']] + [shapes[f'stage{i}'] for i in STAGES] + [shapes['pooled']]
  assert got == want, (name, got, want)
  got = [tuple(f.shape[1:]) for f in feat_pre]
  want = [shapes['stem']] + [shapes[f'preact_stage{i}'] for i in STAGES] + [shapes['pooled']]
  assert got == want, (name, got, want)


def f32(x):
  return np.asarray(x, np.float64).astype(np.float32)


GRID = 64.0  # feature values are multiples of 1/64 (exact in float32; compress better)


def grid(x):
  return (np.round(np.asarray(x, np.float64) * GRID) / GRID).astype(np.float32)


def draw_pair(src, pair, seed, batch):
  """Features (NCHW float32) of one teacher >> student pair, from default_rng(seed).

  Each (sample, channel) of a map gets its own offset so that samples and channels
  differ as they do in real networks (pooled features of i.i.d. noise would be nearly
  identical across samples and make the relation losses degenerate).
  """
  teacher, student = PAIRS[pair]
  rng = np.random.default_rng(seed)
  data = {'labels': rng.integers(0, NUM_CLASSES, batch).astype(np.int64)}
  meta = {}

  def noise(shape):  # shape = (batch, C, H, W)
    offset = rng.normal(0.0, 1.0, shape[:2] + (1, 1))
    return grid(rng.normal(0.0, 1.0, shape) + offset)

  for role, name in (('teacher', teacher), ('student', student)):
    shapes, stage_channels, bn_channels = model_shapes(src, name)
    rd_model_check(src, name, shapes)
    meta[role] = {'model': name, 'shapes': shapes, 'stage_channels': stage_channels,
                  'bn_before_relu_channels': bn_channels,
                  'convention': MODEL_BUILDERS[name][2]}
    bn = None
    if role == 'teacher':
      # The teacher's `get_bn_before_relu()` BatchNorms (OFD's margins come from their
      # weight and bias). Channel 0 gets bias = 4|weight| so that OFD's other branch
      # (margin = -3|weight|, taken when Phi(-bias/|weight|) <= 0.001) is exercised;
      # channel 1 gets a negative weight (OFD takes |weight|).
      bn = []
      for c in bn_channels:
        w = grid(rng.uniform(0.5, 1.5, c))
        b = grid(rng.normal(0.0, 0.5, c))
        w[1] = -w[1]
        b[0] = 4.0 * abs(w[0])
        bn.append((w, b))
        data_key = f'teacher/bn_before_relu{len(bn)}'
        data[data_key + '/weight'] = w
        data[data_key + '/bias'] = b
    data[f'{role}/logits'] = f32(rng.normal(0.0, 3.0, (batch,) + shapes['logits']))
    conv = MODEL_BUILDERS[name][2]
    if conv == 'post_relu':
      # resnet / ShuffleV1 in mdistiller: feats[0] = relu(bn(conv)) = preact_feats[0];
      # feats[i] = relu(preact_feats[i]); pooled_feat = mean over space of feats[3].
      data[f'{role}/stem'] = np.maximum(noise((batch,) + shapes['stem']), 0)
      for i in STAGES:
        pre = noise((batch,) + shapes[f'preact_stage{i}'])
        data[f'{role}/preact_stage{i}'] = pre
        data[f'{role}/stage{i}'] = np.maximum(pre, 0).astype(np.float32)
      data[f'{role}/pooled'] = f32(data[f'{role}/stage3'].astype(np.float64).mean((2, 3)))
    else:
      # WRN in mdistiller (pre-activation blocks): feats[0] = conv1 output, feats[i] =
      # block-group output before any BN/ReLU (either sign), preact_feats[i] = the next
      # BN applied to feats[i] (block2.layer[0].bn1, block3.layer[0].bn1, bn1: exactly
      # get_bn_before_relu()), pooled_feat = mean over space of relu(preact_feats[3]).
      # Here that BN is taken as  stage * weight + bias  per channel (unit running stats).
      data[f'{role}/stem'] = noise((batch,) + shapes['stem'])
      for i in STAGES:
        st = noise((batch,) + shapes[f'stage{i}'])
        w, b = bn[i - 1]
        pre = st.astype(np.float64) * w[None, :, None, None] + b[None, :, None, None]
        data[f'{role}/stage{i}'] = st
        data[f'{role}/preact_stage{i}'] = f32(pre)
        assert np.array_equal(data[f'{role}/preact_stage{i}'].astype(np.float64), pre)
      data[f'{role}/pooled'] = f32(
          np.maximum(data[f'{role}/preact_stage3'].astype(np.float64), 0).mean((2, 3)))
  return data, meta, rng


# ---------------------------------------------------------------------------------------
# Running one method.


class StubNet(nn.Module):
  """Stands in for a network: returns the given (logits, features) whatever the image."""

  def __init__(self, t, role, stage_channels=None, bn_before_relu=None):
    super().__init__()
    feats = [t[f'{role}/stem']] + [t[f'{role}/stage{i}'] for i in STAGES]
    preact = [t[f'{role}/stem']] + [t[f'{role}/preact_stage{i}'] for i in STAGES]
    self._out = (t[f'{role}/logits'],
                 {'feats': feats, 'preact_feats': preact, 'pooled_feat': t[f'{role}/pooled']})
    self._stage_channels = stage_channels
    self._bns = bn_before_relu

  def forward(self, image, *args, **kwargs):
    return self._out

  def get_stage_channels(self):
    return self._stage_channels

  def get_bn_before_relu(self):
    return self._bns


def tensors(data, dtype):
  """Torch tensors of the pair's data: student features are leaves requiring grad."""
  out = {}
  for k, v in data.items():
    if k == 'labels':
      out[k] = torch.from_numpy(v.copy())
    elif k.startswith('student/'):
      out[k] = torch.tensor(v, dtype=dtype, requires_grad=True)
    else:
      out[k] = torch.tensor(v, dtype=dtype)
  return out


def teacher_bns(data, meta):
  bns = []
  for i, c in enumerate(meta['teacher']['bn_before_relu_channels']):
    bn = nn.BatchNorm2d(c)
    with torch.no_grad():
      bn.weight.copy_(torch.from_numpy(data[f'teacher/bn_before_relu{i + 1}/weight']))
      bn.bias.copy_(torch.from_numpy(data[f'teacher/bn_before_relu{i + 1}/bias']))
    bns.append(bn)
  return bns


def connector_entries(module, exclude=('student.', 'teacher.')):
  return [(k, tuple(v.shape)) for k, v in module.state_dict().items()
          if not k.startswith(exclude)]


def fill_weights(module, weights_seed, entries):
  values = state_dict_values(weights_seed, entries)
  sd = module.state_dict()
  with torch.no_grad():
    for k, _ in entries:
      sd[k].copy_(torch.from_numpy(values[k]))


def scalar(x):
  x = x.detach()
  assert x.numel() == 1, x.shape
  return float(x.reshape(()).item())


class Result:
  def __init__(self):
    self.losses = {}        # name -> python float (the file's loss/<name>)
    self.kd_total = None    # torch scalar whose gradient is stored
    self.leaves = {}        # student feature name -> leaf tensor
    self.params = {}        # state_dict key -> parameter (gradient stored)
    self.arrays = {}        # extra arrays to store as they are
    self.spec = {}          # extra spec entries
    self.grads_extra = {}   # other gradient sets: prefix -> (scalar, {key: tensor})
    self.all_leaves = None  # every student tensor the stub handed out (usage check)


def ce(t):
  return F.cross_entropy(t['student/logits'], t['labels'])


# --- mdistiller Distillers (stubbed networks) -----------------------------------------


def run_md_distiller(d, t, student_feats, ce_key='loss_ce', **fwd):
  d.train()
  _, losses = d(image=torch.zeros(t['labels'].shape[0], 3, 32, 32), target=t['labels'], **fwd)
  r = Result()
  for k, v in losses.items():
    r.losses[k[len('loss_'):] if k.startswith('loss_') else k] = v
  r.kd_total = sum(v.reshape(()) for k, v in losses.items() if k != ce_key)
  r.leaves = {f: t['student/' + f] for f in student_feats}
  r.all_leaves = {k[len('student/'):]: v for k, v in t.items() if k.startswith('student/')}
  for k, p in d.named_parameters():
    if not k.startswith(('student.', 'teacher.')):
      r.params[k] = p
  return r


def md_build(cls, t, meta, cfg, *extra, **kw):
  teacher = StubNet(t, 'teacher', meta['teacher']['stage_channels'],
                    kw.pop('bns', None))
  student = StubNet(t, 'student', meta['student']['stage_channels'])
  return cls(student, teacher, cfg, *extra)


def method_kd(ctx, dtype, variant):
  src, t = ctx.src, ctx.tensors(dtype)
  if variant == 'ls':
    mod = src.ls('KD')
    cfg = ctx.src.ls_cfg('configs/cifar100/kd/resnet32x4_resnet8x4.yaml')
    apply_logit_stand(cfg, 'KD')
  else:
    mod = src.md('KD')
    cfg = ctx.src.md_cfg('configs/cifar100/kd.yaml')
  d = md_build(mod.KD, t, ctx.meta, cfg)
  r = run_md_distiller(d, t, ['logits'])
  if variant == 'ls':
    unw = mod.kd_loss(t['student/logits'], t['teacher/logits'], cfg.KD.TEMPERATURE, True)
  else:
    unw = mod.kd_loss(t['student/logits'], t['teacher/logits'], cfg.KD.TEMPERATURE)
  r.losses['kd_unweighted'] = unw
  r.spec['hyper'] = {'temperature': float(cfg.KD.TEMPERATURE),
                     'ce_weight': float(cfg.KD.LOSS.CE_WEIGHT),
                     'kd_weight': float(cfg.KD.LOSS.KD_WEIGHT)}
  if variant == 'ls':
    r.spec['hyper']['logit_stand'] = True
  return r


def apply_logit_stand(cfg, kind, base_temp=2.0, kd_weight=9.0):
  """logit-standardization-KD tools/train.py:110-121 with --logit-stand --base-temp 2
  --kd-weight 9 (the README's command for resnet32x4 >> resnet8x4)."""
  cfg.defrost()
  cfg.EXPERIMENT.LOGIT_STAND = True
  if kind == 'KD':
    cfg.KD.LOSS.KD_WEIGHT = kd_weight
    cfg.KD.TEMPERATURE = base_temp
  elif kind == 'DKD':
    cfg.DKD.ALPHA = cfg.DKD.ALPHA * kd_weight
    cfg.DKD.BETA = cfg.DKD.BETA * kd_weight
    cfg.DKD.T = base_temp


def method_dkd(ctx, dtype, variant, epoch):
  src, t = ctx.src, ctx.tensors(dtype)
  if variant == 'ls':
    mod = src.ls('DKD')
    cfg = ctx.src.ls_cfg('configs/cifar100/dkd/resnet32x4_resnet8x4.yaml')
    apply_logit_stand(cfg, 'DKD')
    extra = (True,)
  else:
    mod = src.md('DKD')
    cfg = ctx.src.md_cfg('configs/cifar100/dkd/res32x4_res8x4.yaml')
    extra = ()
  d = md_build(mod.DKD, t, ctx.meta, cfg)
  r = run_md_distiller(d, t, ['logits'], epoch=epoch)
  a, b, T = cfg.DKD.ALPHA, cfg.DKD.BETA, cfg.DKD.T
  s, te, y = t['student/logits'], t['teacher/logits'], t['labels']
  r.losses['kd_unweighted'] = mod.dkd_loss(s, te, y, a, b, T, *extra)
  r.losses['tckd'] = mod.dkd_loss(s, te, y, 1.0, 0.0, T, *extra)
  r.losses['nckd'] = mod.dkd_loss(s, te, y, 0.0, 1.0, T, *extra)
  r.spec['hyper'] = {'alpha': float(a), 'beta': float(b), 'temperature': float(T),
                     'warmup': int(cfg.DKD.WARMUP), 'epoch': epoch,
                     'warmup_factor': min(epoch / cfg.DKD.WARMUP, 1.0),
                     'ce_weight': float(cfg.DKD.CE_WEIGHT)}
  if variant == 'ls':
    r.spec['hyper']['logit_stand'] = True
  return r


def md_feature_method(ctx, dtype, module, cls, yaml, student_feats, cfg_section,
                      weighted=True, **fwd):
  t = ctx.tensors(dtype)
  mod = ctx.src.md(module)
  cfg = ctx.src.md_cfg(yaml)
  d = md_build(getattr(mod, cls), t, ctx.meta, cfg)
  r = run_md_distiller(d, t, student_feats, **fwd)
  sec = getattr(cfg, cfg_section)
  w = float(sec.LOSS.FEAT_WEIGHT)
  r.losses['kd_unweighted'] = r.losses['kd'] / w
  r.spec['hyper'] = {'feat_weight': w, 'ce_weight': float(sec.LOSS.CE_WEIGHT)}
  return r, d, cfg, mod


def method_at(ctx, dtype):
  r, d, cfg, mod = md_feature_method(ctx, dtype, 'AT', 'AT', 'configs/cifar100/at.yaml',
                                     [f'stage{i}' for i in STAGES], 'AT')
  r.spec['hyper']['p'] = float(cfg.AT.P)
  # RepDistiller's Attention (distiller_zoo/AT.py) on feat[1:-1] (helper/loops.py:134-138),
  # beta 1000 (scripts/run_cifar_distill.sh): must be the same computation.
  t = ctx.tensors(dtype)
  att = ctx.src.rd('AT').Attention(p=2)
  g_s = [t[f'student/stage{i}'] for i in STAGES]
  g_t = [t[f'teacher/stage{i}'] for i in STAGES]
  rd_loss = 1000.0 * sum(att(g_s, g_t))
  rd_loss.backward()
  md_loss = r.kd_total
  grads = torch.autograd.grad(md_loss, [r.leaves[f'stage{i}'] for i in STAGES], retain_graph=True)
  diffs = [float((g - t[f'student/stage{i}'].grad).abs().max()) for g, i in zip(grads, STAGES)]
  r.spec['repdistiller_at'] = {
      'loss': scalar(rd_loss), 'abs_diff_loss': abs(scalar(rd_loss) - scalar(md_loss)),
      'max_abs_diff_grads': max(diffs)}
  return r


def method_sp(ctx, dtype):
  r, *_ = md_feature_method(ctx, dtype, 'SP', 'SP', 'configs/cifar100/sp.yaml', ['stage3'], 'SP')
  return r


def method_nst(ctx, dtype):
  r, *_ = md_feature_method(ctx, dtype, 'NST', 'NST', 'configs/cifar100/nst.yaml',
                            [f'stage{i}' for i in STAGES], 'NST')
  return r


def method_pkt(ctx, dtype):
  r, *_ = md_feature_method(ctx, dtype, 'PKT', 'PKT', 'configs/cifar100/pkt.yaml', ['pooled'],
                            'PKT')
  return r


def method_rkd(ctx, dtype):
  r, d, cfg, mod = md_feature_method(ctx, dtype, 'RKD', 'RKD', 'configs/cifar100/rkd.yaml',
                                     ['pooled'], 'RKD')
  t = ctx.tensors(dtype)
  s, te = t['student/pooled'], t['teacher/pooled']
  r.losses['rkd_distance_unweighted'] = mod.rkd_loss(s, te, cfg.RKD.PDIST.SQUARED,
                                                     cfg.RKD.PDIST.EPSILON, 1.0, 0.0)
  r.losses['rkd_angle_unweighted'] = mod.rkd_loss(s, te, cfg.RKD.PDIST.SQUARED,
                                                  cfg.RKD.PDIST.EPSILON, 0.0, 1.0)
  r.spec['hyper'].update({'distance_weight': float(cfg.RKD.DISTANCE_WEIGHT),
                          'angle_weight': float(cfg.RKD.ANGLE_WEIGHT),
                          'pdist_eps': float(cfg.RKD.PDIST.EPSILON),
                          'pdist_squared': bool(cfg.RKD.PDIST.SQUARED)})
  return r


@contextlib.contextmanager
def no_float_cast():
  """Makes Tensor.float() keep float64 (mdistiller's KDSVD svd() casts to float32)."""
  orig = torch.Tensor.float

  def keep(self, *a, **k):
    return self if self.dtype == torch.float64 else orig(self, *a, **k)
  torch.Tensor.float = keep
  try:
    yield
  finally:
    torch.Tensor.float = orig


def method_kdsvd(ctx, dtype):
  cm = no_float_cast() if dtype == torch.float64 else contextlib.nullcontext()
  with cm:
    r, d, cfg, mod = md_feature_method(ctx, dtype, 'KDSVD', 'KDSVD',
                                       'configs/cifar100/kdsvd.yaml',
                                       [f'stage{i}' for i in STAGES], 'KDSVD')
  k = int(cfg.KDSVD.K)
  r.spec['hyper']['k'] = k
  if dtype == torch.float64:
    t = ctx.tensors(dtype)
    g_s = [t[f'student/stage{i}'] for i in STAGES]
    g_t = [t[f'teacher/stage{i}'] for i in STAGES]
    # As the original runs it (svd() casts to float32).
    r.losses['kd_with_float32_svd'] = cfg.KDSVD.LOSS.FEAT_WEIGHT * mod.kdsvd_loss(g_s, g_t, k)
    with no_float_cast():
      for j, (f_s, f_t) in enumerate(zip(g_s, g_t)):
        _, _, v_t = mod.svd(f_t, k)
        _, _, v_s = mod.svd(f_s, k + 3)
        v_s, v_t = mod.align_rsv(v_s, v_t)
        r.arrays[f'kdsvd/teacher_v{j + 1}'] = v_t.detach().numpy().astype(np.float32)
        r.arrays[f'kdsvd/student_v_aligned{j + 1}'] = v_s.detach().numpy().astype(np.float32)
      r.spec['sign_sensitivity'] = kdsvd_sign_sensitivity(mod, g_s, g_t, k, mod.kdsvd_loss,
                                                          'module')
  return r


def kdsvd_sign_sensitivity(owner, g_s, g_t, k, loss_fn, kind):
  """Loss when the teacher's singular vector of one stage has the other sign.

  `owner.svd` (the mdistiller module's function, or RepDistiller's KDSVD instance's
  method) is wrapped for one call: the teacher's svd is the first of each stage's two.
  """
  out = {}
  for flip_stage in range(len(g_t)):
    calls = {'n': 0}
    orig = owner.svd

    def flipped(feat, n=1, _orig=orig, _flip=flip_stage):
      u, s, v = _orig(feat, n)
      i = calls['n']
      calls['n'] += 1
      if i == 2 * _flip:  # teacher svd is called first for each stage
        v = -v
      return u, s, v
    owner.svd = flipped
    try:
      val = loss_fn(g_s, g_t, k) if kind == 'module' else sum(loss_fn(g_s, g_t))
    finally:
      owner.svd = orig
    out[f'teacher_v{flip_stage + 1}_negated'] = scalar(val)
  return out


def method_fitnet(ctx, dtype):
  t = ctx.tensors(dtype)
  mod = ctx.src.md('FitNet')
  ctx.src.md('_common')
  cfg = ctx.src.md_cfg('configs/cifar100/fitnet.yaml')
  d = md_build(mod.FitNet, t, ctx.meta, cfg)
  ctx.prepare_weights(d, dtype)
  h = int(cfg.FITNET.HINT_LAYER)
  r = run_md_distiller(d, t, [f'stage{h}'])
  w = float(cfg.FITNET.LOSS.FEAT_WEIGHT)
  r.losses['kd_unweighted'] = r.losses['kd'] / w
  r.spec['hyper'] = {'hint_layer': h, 'feat_weight': w,
                     'ce_weight': float(cfg.FITNET.LOSS.CE_WEIGHT)}
  r.spec['connector'] = repr(d.conv_reg)
  r.spec['module_mode'] = 'train (Distiller.train(): conv_reg in train mode, BatchNorm uses batch statistics)'
  ctx.state_after(r, d)
  return r


def method_vid(ctx, dtype):
  t = ctx.tensors(dtype)
  mod = ctx.src.md('VID')
  cfg = ctx.src.md_cfg('configs/cifar100/vid.yaml')
  d = md_build(mod.VID, t, ctx.meta, cfg)
  ctx.prepare_weights(d, dtype)
  # log_scales is a plain Python list in mdistiller (not registered: not in state_dict,
  # not in get_learnable_parameters, not moved by .to()); keep their initial value,
  # in the run's dtype, and report their gradient.
  d.log_scales = [nn.Parameter(ls.detach().to(dtype)) for ls in d.log_scales]
  r = run_md_distiller(d, t, [f'stage{i}' for i in STAGES])
  for i, ls in enumerate(d.log_scales):
    r.params[f'log_scales.{i}'] = ls
    r.arrays[f'vid/log_scale{i}'] = ls.detach().numpy().astype(np.float32)
  w = float(cfg.VID.LOSS.FEAT_WEIGHT)
  r.losses['kd_unweighted'] = r.losses['kd'] / w
  r.spec['hyper'] = {'feat_weight': w, 'ce_weight': float(cfg.VID.LOSS.CE_WEIGHT),
                     'eps': float(cfg.VID.EPS), 'init_pred_var': float(cfg.VID.INIT_PRED_VAR)}
  r.spec['module_mode'] = 'train (no BatchNorm in the regressors)'
  return r


def method_ofd(ctx, dtype):
  t = ctx.tensors(dtype)
  mod = ctx.src.md('OFD')
  cfg = ctx.src.md_cfg('configs/cifar100/ofd.yaml')
  bns = teacher_bns(ctx.data, ctx.meta)
  d = md_build(mod.OFD, t, ctx.meta, cfg, bns=bns)
  ctx.prepare_weights(d, dtype)
  r = run_md_distiller(d, t, [f'preact_stage{i}' for i in STAGES])
  for i, m in enumerate(d.margins):
    r.arrays[f'ofd/margin{i + 1}'] = m.reshape(-1).numpy().astype(np.float32)
    assert m.dtype == torch.float32
  w = float(cfg.OFD.LOSS.FEAT_WEIGHT)
  r.losses['kd_unweighted'] = r.losses['kd'] / w
  r.spec['hyper'] = {'feat_weight': w, 'ce_weight': float(cfg.OFD.LOSS.CE_WEIGHT),
                     'connector_kernel_size': int(cfg.OFD.CONNECTOR.KERNEL_SIZE)}
  r.spec['module_mode'] = ('train: OFD overrides Distiller.train() and puts every child, '
                           'the connectors and also the teacher, in train mode; the '
                           'connectors\' BatchNorms use batch statistics')
  if ctx.meta['student']['model'] == 'ShuffleV1':
    r.spec['note'] = ('mdistiller\'s ShuffleV1 has no get_stage_channels(); OFD.__init__ '
                      'would raise AttributeError for this student. The stub returns the '
                      'ShuffleV1 stage channels [24, 240, 480, 960] (of which OFD uses [1:]).')
  ctx.state_after(r, d)
  return r


def method_crd(ctx, dtype):
  t = ctx.tensors(dtype)
  mod = ctx.src.md('CRD')
  cfg = ctx.src.md_cfg('configs/cifar100/crd.yaml')
  cfg.defrost()
  # Sizes that fit a test file (the original: n_data = 50000, K = 16384).
  n_data, nce_k = ctx.crd_n_data, ctx.crd_k
  cfg.CRD.NCE.K = nce_k
  s_dim = ctx.meta['student']['shapes']['pooled'][0]
  t_dim = ctx.meta['teacher']['shapes']['pooled'][0]
  # mdistiller's defaults (256, 256) are resnet8x4's and resnet32x4's pooled sizes;
  # RepDistiller takes them from the models (train_student.py:191-192).
  cfg.CRD.FEAT.STUDENT_DIM = s_dim
  cfg.CRD.FEAT.TEACHER_DIM = t_dim
  orig_cuda = mod.AliasMethod.cuda
  mod.AliasMethod.cuda = lambda self: None  # ContrastMemory.__init__ calls it (CPU here)
  try:
    d = md_build(mod.CRD, t, ctx.meta, cfg, n_data)
  finally:
    mod.AliasMethod.cuda = orig_cuda
  entries = connector_entries(d)
  entries = [e for e in entries if not e[0].startswith('contrast.')]
  ctx.prepare_weights(d, dtype, entries)
  crd = ctx.crd_draws(n_data, nce_k, cfg.CRD.FEAT.DIM, t['labels'].shape[0])
  with torch.no_grad():
    d.contrast.memory_v1.copy_(torch.from_numpy(crd['memory_s_before']))
    d.contrast.memory_v2.copy_(torch.from_numpy(crd['memory_t_before']))
  idx = torch.from_numpy(crd['index'])
  cidx = torch.from_numpy(crd['contrast_idx'])
  r = run_md_distiller(d, t, ['pooled'], index=idx, contrastive_index=cidx)
  w = float(cfg.CRD.LOSS.FEAT_WEIGHT)
  r.losses['kd_unweighted'] = r.losses['kd'] / w
  params = d.contrast.params.detach().clone()
  r.arrays['crd/index'] = crd['index']
  r.arrays['crd/contrast_idx'] = crd['contrast_idx']
  r.arrays['crd/memory_s_before'] = crd['memory_s_before']
  r.arrays['crd/memory_t_before'] = crd['memory_t_before']
  r.arrays['crd/memory_s_after'] = d.contrast.memory_v1.detach().numpy().astype(np.float32)
  r.arrays['crd/memory_t_after'] = d.contrast.memory_v2.detach().numpy().astype(np.float32)
  r.arrays['crd/Z_s'] = np.float64(params[2].item())
  r.arrays['crd/Z_t'] = np.float64(params[3].item())
  r.arrays['crd/temperature'] = np.float64(params[1].item())
  # The s and t terms separately (same inputs, same memory, same Z) for the file.
  with torch.no_grad():
    f_s = d.embed_s(t['student/pooled'])
    f_t = d.embed_t(t['teacher/pooled'])
    r.arrays['crd/embed_s'] = f_s.numpy().astype(np.float32)
    r.arrays['crd/embed_t'] = f_t.numpy().astype(np.float32)
  # Second step: the memory as updated by step 1, Z kept from step 1, a new batch of
  # indices (same features).
  with torch.no_grad():
    d.train()
    _, losses2 = d(image=torch.zeros(1), target=t['labels'],
                   index=torch.from_numpy(crd['index2']),
                   contrastive_index=torch.from_numpy(crd['contrast_idx2']))
  r.losses['kd_step2'] = losses2['loss_kd']
  r.arrays['crd/step2/index'] = crd['index2']
  r.arrays['crd/step2/contrast_idx'] = crd['contrast_idx2']
  r.arrays['crd/step2/memory_s_after'] = d.contrast.memory_v1.detach().numpy().astype(np.float32)
  r.arrays['crd/step2/memory_t_after'] = d.contrast.memory_v2.detach().numpy().astype(np.float32)
  assert d.contrast.params[2].item() == params[2].item()
  r.spec['hyper'] = {'feat_weight': w, 'ce_weight': float(cfg.CRD.LOSS.CE_WEIGHT),
                     'feat_dim': int(cfg.CRD.FEAT.DIM), 'student_dim': s_dim,
                     'teacher_dim': t_dim, 'n_data': n_data, 'nce_k': nce_k,
                     'nce_t': float(cfg.CRD.NCE.TEMPERATURE),
                     'nce_t_as_used': float(params[1].item()),
                     'momentum': float(cfg.CRD.NCE.MOMENTUM), 'mode': cfg.CRD.MODE,
                     'original_nce_k': 16384, 'original_n_data': 50000}
  r.spec['module_mode'] = 'train (Embed has no BatchNorm); teacher eval'
  return r


def method_reviewkd(ctx, dtype, epoch=10):
  t = ctx.tensors(dtype)
  mod = ctx.src.md('ReviewKD')
  cfg = ctx.src.md_cfg('configs/cifar100/reviewkd.yaml')
  if ctx.meta['student']['model'] == 'ShuffleV1':
    # mdistiller has no config for this pair; these are the values of the original
    # ReviewKD (dvlab-research/ReviewKD CIFAR-100/model/reviewkd.py, build_review_kd,
    # 'shufflev1' with a 'wrn' teacher) and its script (--kd-loss-weight 5.0).
    cfg.defrost()
    cfg.REVIEWKD.IN_CHANNELS = [240, 480, 960, 960]
    cfg.REVIEWKD.OUT_CHANNELS = [32, 64, 128, 128]
    cfg.REVIEWKD.SHAPES = [1, 4, 8, 16]
    cfg.REVIEWKD.OUT_SHAPES = [1, 8, 16, 32]
  d = md_build(mod.ReviewKD, t, ctx.meta, cfg)
  ctx.prepare_weights(d, dtype)
  r = run_md_distiller(d, t, [f'stage{i}' for i in STAGES] + ['pooled'], epoch=epoch)
  factor = min(epoch / cfg.REVIEWKD.WARMUP_EPOCHS, 1.0)
  w = float(cfg.REVIEWKD.REVIEWKD_WEIGHT)
  r.losses['kd_unweighted'] = r.losses['kd'] / (w * factor)
  r.spec['hyper'] = {'reviewkd_weight': w, 'ce_weight': float(cfg.REVIEWKD.CE_WEIGHT),
                     'warmup_epochs': int(cfg.REVIEWKD.WARMUP_EPOCHS), 'epoch': epoch,
                     'warmup_factor': factor, 'shapes': list(cfg.REVIEWKD.SHAPES),
                     'out_shapes': list(cfg.REVIEWKD.OUT_SHAPES),
                     'in_channels': list(cfg.REVIEWKD.IN_CHANNELS),
                     'out_channels': list(cfg.REVIEWKD.OUT_CHANNELS),
                     'mid_channel': min(512, cfg.REVIEWKD.IN_CHANNELS[-1]),
                     'stu_preact': bool(cfg.REVIEWKD.STU_PREACT)}
  r.spec['module_mode'] = 'train (ABF BatchNorms use batch statistics)'
  ctx.state_after(r, d)
  return r


# --- RepDistiller criteria ---------------------------------------------------------------


def rd_result(t, leaves):
  r = Result()
  r.leaves = {f: t['student/' + f] for f in leaves}
  r.losses['ce'] = ce(t)  # gamma = 1 (train_student.py:73)
  return r


def rd_shape(meta, role, key, batch):
  return torch.Size((batch,) + meta[role]['shapes'][key])


def method_cc(ctx, dtype):
  t = ctx.tensors(dtype)
  util = ctx.src.rd_models_util()
  cc = ctx.src.rd('CC').Correlation()
  s_dim = ctx.meta['student']['shapes']['pooled'][0]
  t_dim = ctx.meta['teacher']['shapes']['pooled'][0]
  host = nn.ModuleDict({'embed_s': util.LinearEmbed(s_dim, 128),
                        'embed_t': util.LinearEmbed(t_dim, 128)})
  ctx.prepare_weights(host, dtype)
  host.train()
  f_s = host['embed_s'](t['student/pooled'])
  f_t = host['embed_t'](t['teacher/pooled'])
  beta = 0.02
  loss = cc(f_s, f_t)
  r = rd_result(t, ['pooled'])
  r.losses['kd'] = beta * loss
  r.losses['kd_unweighted'] = loss
  r.kd_total = beta * loss
  r.params = dict(host.named_parameters())
  r.spec['hyper'] = {'beta': beta, 'feat_dim': 128, 'alpha_kl': 0.0, 'gamma_ce': 1.0}
  r.spec['module_mode'] = 'train (no BatchNorm); embed_t is trained too (trainable_list)'
  return r


def method_ab(ctx, dtype):
  t = ctx.tensors(dtype)
  util = ctx.src.rd_models_util()
  B = t['labels'].shape[0]
  s_shapes = [rd_shape(ctx.meta, 'student', f'stage{i}', B) for i in STAGES]
  t_shapes = [rd_shape(ctx.meta, 'teacher', f'stage{i}', B) for i in STAGES]
  connector = util.Connector(s_shapes, t_shapes)
  host = nn.ModuleDict({'connector': connector})
  ctx.prepare_weights(host, dtype)
  host.train()  # init stage: init_modules.train() (helper/pretrain.py:14)
  crit = ctx.src.rd('AB').ABLoss(len(s_shapes), margin=1.0)
  g_s = connector([t[f'student/preact_stage{i}'] for i in STAGES])
  g_t = [t[f'teacher/preact_stage{i}'] for i in STAGES]
  group = crit(g_s, g_t)
  r = rd_result(t, [f'preact_stage{i}' for i in STAGES])
  total = sum(group)
  r.losses['kd'] = total
  for i, l in enumerate(group):
    r.losses[f'kd_stage{i + 1}'] = l
  r.kd_total = total
  r.params = dict(host.named_parameters())
  r.spec['hyper'] = {'margin': 1.0, 'stage_weights': list(crit.w), 'beta_main_stage': 1.0,
                     'alpha_kl': 0.0, 'init_epochs': 30,
                     'init_lr': 0.01 if ctx.meta['student']['model'] in (
                         'MobileNetV2', 'ShuffleV1', 'ShuffleV2') else 0.05}
  r.spec['connectors'] = [repr(c) for c in connector.connectors]
  r.spec['module_mode'] = ('train (init stage: the connector in train mode, its '
                           'BatchNorms use batch statistics)')
  ctx.state_after(r, host)
  return r


def method_ft(ctx, dtype):
  t = ctx.tensors(dtype)
  util = ctx.src.rd_models_util()
  B = t['labels'].shape[0]
  s_shape = rd_shape(ctx.meta, 'student', 'stage3', B)
  t_shape = rd_shape(ctx.meta, 'teacher', 'stage3', B)
  host = nn.ModuleDict({'translator': util.Translator(s_shape, t_shape),
                        'paraphraser': util.Paraphraser(t_shape)})
  ctx.prepare_weights(host, dtype)
  ft = ctx.src.rd('FT').FactorTransfer()
  # Main stage (helper/loops.py:76-79, 177-180): translator train, paraphraser eval.
  host['translator'].train()
  host['paraphraser'].eval()
  factor_s = host['translator'](t['student/stage3'])
  factor_t = host['paraphraser'](t['teacher/stage3'], is_factor=True)
  loss = ft(factor_s, factor_t)
  beta = 200.0
  r = rd_result(t, ['stage3'])
  r.losses['kd'] = beta * loss
  r.losses['kd_unweighted'] = loss
  r.kd_total = beta * loss
  r.params = dict(host.named_parameters())
  # Init stage (helper/pretrain.py:68-71): the paraphraser alone, MSE reconstruction.
  par = copy.deepcopy(host['paraphraser'])
  par.train()
  _, rec = par(t['teacher/stage3'])
  init_loss = F.mse_loss(rec, t['teacher/stage3'])
  r.losses['init_reconstruction'] = init_loss
  r.grads_extra['grad_init'] = (init_loss, {'paraphraser.' + k: p
                                            for k, p in par.named_parameters()})
  r.spec['hyper'] = {'beta': beta, 'p1': ft.p1, 'p2': ft.p2, 'k': 0.5,
                     'paraphraser_use_bn': False, 'translator_use_bn': True,
                     'leaky_relu_slope': 0.1, 'alpha_kl': 0.0, 'init_epochs': 30,
                     'init_lr': 0.01 if ctx.meta['student']['model'] in (
                         'resnet8', 'resnet14', 'resnet20', 'resnet32', 'resnet44',
                         'resnet56', 'resnet110', 'resnet8x4', 'resnet32x4', 'wrn_16_1',
                         'wrn_16_2', 'wrn_40_1', 'wrn_40_2', 'MobileNetV2', 'ShuffleV1',
                         'ShuffleV2') else 0.05}
  r.spec['module_mode'] = ('main stage: translator train (BatchNorm batch statistics), '
                           'paraphraser eval (it has no BatchNorm); init stage: paraphraser '
                           'train')
  ctx.state_after(r, host)
  return r


def method_fsp(ctx, dtype):
  t = ctx.tensors(dtype)
  B = t['labels'].shape[0]
  names = ['stem'] + [f'stage{i}' for i in STAGES]
  s_shapes = [rd_shape(ctx.meta, 'student', n, B) for n in names]
  t_shapes = [rd_shape(ctx.meta, 'teacher', n, B) for n in names]
  fsp = ctx.src.rd('FSP').FSP(s_shapes, t_shapes)
  group = fsp([t['student/' + n] for n in names], [t['teacher/' + n] for n in names])
  r = rd_result(t, names)
  total = sum(group)
  r.losses['kd'] = total
  for i, l in enumerate(group):
    r.losses[f'kd_pair{i + 1}'] = l
  r.kd_total = total
  r.spec['hyper'] = {'beta_main_stage': 50.0, 'alpha_kl': 0.0, 'init_epochs': 30,
                     'init_lr': 0.01 if ctx.meta['student']['model'] in (
                         'MobileNetV2', 'ShuffleV1', 'ShuffleV2') else 0.05}
  return r


def method_kdsvd_rd(ctx, dtype):
  t = ctx.tensors(dtype)
  crit = ctx.src.rd('KDSVD').KDSVD(k=1)
  g_s = [t[f'student/stage{i}'] for i in STAGES]
  g_t = [t[f'teacher/stage{i}'] for i in STAGES]
  group = crit(g_s, g_t)
  r = rd_result(t, [f'stage{i}' for i in STAGES])
  beta = 1.0
  total = beta * sum(group)
  r.losses['kd'] = total
  for i, l in enumerate(group):
    r.losses[f'kd_pair{i + 1}'] = l
  r.kd_total = total
  r.spec['hyper'] = {'k': 1, 'beta': beta}
  if dtype == torch.float64:
    for j, (f_s, f_t) in enumerate(zip(g_s, g_t)):
      _, _, v_t = crit.svd(f_t, 1)
      _, _, v_s = crit.svd(f_s, 4)
      v_s, v_t = crit.align_rsv(v_s, v_t)
      r.arrays[f'kdsvd/teacher_v{j + 1}'] = v_t.detach().numpy().astype(np.float32)
      r.arrays[f'kdsvd/student_v_aligned{j + 1}'] = v_s.detach().numpy().astype(np.float32)
    r.spec['sign_sensitivity'] = kdsvd_sign_sensitivity(crit, g_s, g_t, 1, crit, 'rd')
  return r


# --- DIST --------------------------------------------------------------------------------


def dist_hyper(ctx):
  """kd: dist_t4, kd_loss_weight 2, ori_loss_weight 1 (configs/strategies/distill/
  dist_cifar.yaml); lib/models/losses/kd_loss.py: 'dist_t<tau>' -> DIST(beta=1, gamma=1,
  tau=float(<tau>))."""
  y = ctx.src.dist_cifar_config() or {}
  kd = y.get('kd', 'dist_t4')
  tau = float(kd[6:]) if kd.startswith('dist_t') else 1.0
  return {'kd': kd, 'tau': tau, 'beta': 1.0, 'gamma': 1.0,
          'kd_loss_weight': float(y.get('kd_loss_weight', 2.0)),
          'ori_loss_weight': float(y.get('ori_loss_weight', 1.0))}


def method_dist(ctx, dtype, variant):
  t = ctx.tensors(dtype)
  mod = ctx.src.dist()
  h = dist_hyper(ctx)
  crit = mod.DIST(beta=h['beta'], gamma=h['gamma'], tau=h['tau'])
  z_s, z_t = t['student/logits'], t['teacher/logits']
  if variant == 'ls':
    normalize = ctx.src.ls('KD').normalize
    z_s, z_t = normalize(z_s), normalize(z_t)
  loss = crit(z_s, z_t)
  y_s = (z_s / h['tau']).softmax(dim=1)
  y_t = (z_t / h['tau']).softmax(dim=1)
  r = Result()
  r.leaves = {'logits': t['student/logits']}
  r.losses['ce'] = h['ori_loss_weight'] * ce(t)
  r.losses['kd'] = h['kd_loss_weight'] * loss
  r.losses['kd_unweighted'] = loss
  r.losses['inter'] = h['tau'] ** 2 * mod.inter_class_relation(y_s, y_t)
  r.losses['intra'] = h['tau'] ** 2 * mod.intra_class_relation(y_s, y_t)
  r.kd_total = r.losses['kd']
  r.spec['hyper'] = h
  if variant == 'ls':
    r.spec['hyper']['logit_stand'] = True
  return r


# ---------------------------------------------------------------------------------------
# Files.

FEATURES_READ = {  # kd_jax feature names each method reads (student and teacher)
    'kd': (['logits'], ['logits']),
    'dkd': (['logits'], ['logits']),
    'dist': (['logits'], ['logits']),
    'at': ([f'stage{i}' for i in STAGES],) * 2,
    'nst': ([f'stage{i}' for i in STAGES],) * 2,
    'kdsvd': ([f'stage{i}' for i in STAGES],) * 2,
    'kdsvd_rd': ([f'stage{i}' for i in STAGES],) * 2,
    'vid': ([f'stage{i}' for i in STAGES],) * 2,
    'sp': (['stage3'], ['stage3']),
    'ft': (['stage3'], ['stage3']),
    'fitnet': (['stage2'], ['stage2']),
    'pkt': (['pooled'], ['pooled']),
    'rkd': (['pooled'], ['pooled']),
    'crd': (['pooled'], ['pooled']),
    'cc': (['pooled'], ['pooled']),
    'ofd': ([f'preact_stage{i}' for i in STAGES],) * 2,
    'ab': ([f'preact_stage{i}' for i in STAGES],) * 2,
    'reviewkd': ([f'stage{i}' for i in STAGES] + ['pooled'],
                 [f'preact_stage{i}' for i in STAGES] + ['pooled']),
    'fsp': (['stem'] + [f'stage{i}' for i in STAGES],) * 2,
}

SOURCES = {
    'kd': ('megvii-research/mdistiller', 'mdistiller/distillers/KD.py', 'KD, kd_loss'),
    'kd_ls': ('sunshangquan/logit-standardization-KD', 'mdistiller/distillers/KD.py',
              'KD, kd_loss, normalize'),
    'dkd': ('megvii-research/mdistiller', 'mdistiller/distillers/DKD.py', 'DKD, dkd_loss'),
    'dkd_ls': ('sunshangquan/logit-standardization-KD', 'mdistiller/distillers/DKD.py',
               'DKD, dkd_loss, normalize'),
    'dist': ('hunto/image_classification_sota (DIST_KD classification submodule)',
             'lib/models/losses/dist_kd.py', 'DIST, inter_class_relation, intra_class_relation'),
    'dist_ls': ('hunto/image_classification_sota + sunshangquan/logit-standardization-KD',
                'lib/models/losses/dist_kd.py + mdistiller/distillers/KD.py',
                'DIST applied to normalize(z_s), normalize(z_t)'),
    'at': ('megvii-research/mdistiller', 'mdistiller/distillers/AT.py', 'AT, at_loss'),
    'sp': ('megvii-research/mdistiller', 'mdistiller/distillers/SP.py', 'SP, sp_loss'),
    'nst': ('megvii-research/mdistiller', 'mdistiller/distillers/NST.py', 'NST, nst_loss'),
    'pkt': ('megvii-research/mdistiller', 'mdistiller/distillers/PKT.py', 'PKT, pkt_loss'),
    'rkd': ('megvii-research/mdistiller', 'mdistiller/distillers/RKD.py', 'RKD, rkd_loss'),
    'kdsvd': ('megvii-research/mdistiller', 'mdistiller/distillers/KDSVD.py', 'KDSVD, kdsvd_loss'),
    'fitnet': ('megvii-research/mdistiller', 'mdistiller/distillers/FitNet.py + _common.py',
               'FitNet, ConvReg'),
    'vid': ('megvii-research/mdistiller', 'mdistiller/distillers/VID.py', 'VID, vid_loss'),
    'ofd': ('megvii-research/mdistiller', 'mdistiller/distillers/OFD.py',
            'OFD, ConnectorConvBN, feat_loss'),
    'crd': ('megvii-research/mdistiller', 'mdistiller/distillers/CRD.py',
            'CRD, Embed, ContrastMemory, ContrastLoss'),
    'reviewkd': ('megvii-research/mdistiller', 'mdistiller/distillers/ReviewKD.py',
                 'ReviewKD, ABF, hcl_loss'),
    'cc': ('HobbitLong/RepDistiller', 'distiller_zoo/CC.py + models/util.py',
           'Correlation, LinearEmbed'),
    'ab': ('HobbitLong/RepDistiller', 'distiller_zoo/AB.py + models/util.py',
           'ABLoss, Connector, ConvReg(use_relu=False)'),
    'ft': ('HobbitLong/RepDistiller', 'distiller_zoo/FT.py + models/util.py',
           'FactorTransfer, Translator, Paraphraser'),
    'fsp': ('HobbitLong/RepDistiller', 'distiller_zoo/FSP.py', 'FSP'),
    'kdsvd_rd': ('HobbitLong/RepDistiller', 'distiller_zoo/KDSVD.py', 'KDSVD'),
}


def file_plan():
  """(file method name, base method, runner, pairs)."""
  A, B = 'resnet32x4__resnet8x4', 'wrn_40_2__ShuffleV1'
  plan = [
      ('kd', 'kd', lambda c, d: method_kd(c, d, ''), [A]),
      ('kd_ls', 'kd', lambda c, d: method_kd(c, d, 'ls'), [A]),
      ('dkd_epoch5', 'dkd', lambda c, d: method_dkd(c, d, '', 5), [A]),
      ('dkd_epoch30', 'dkd', lambda c, d: method_dkd(c, d, '', 30), [A]),
      ('dkd_ls_epoch5', 'dkd', lambda c, d: method_dkd(c, d, 'ls', 5), [A]),
      ('dkd_ls_epoch30', 'dkd', lambda c, d: method_dkd(c, d, 'ls', 30), [A]),
      ('dist', 'dist', lambda c, d: method_dist(c, d, ''), [A]),
      ('dist_ls', 'dist', lambda c, d: method_dist(c, d, 'ls'), [A]),
      ('at', 'at', method_at, [A, B]),
      ('sp', 'sp', method_sp, [A, B]),
      ('nst', 'nst', method_nst, [A, B]),
      ('pkt', 'pkt', method_pkt, [A, B]),
      ('rkd', 'rkd', method_rkd, [A, B]),
      ('kdsvd', 'kdsvd', method_kdsvd, [A]),
      ('kdsvd_rd', 'kdsvd_rd', method_kdsvd_rd, [A]),
      ('fitnet', 'fitnet', method_fitnet, [A, B]),
      ('vid', 'vid', method_vid, [A, B]),
      ('ofd', 'ofd', method_ofd, [A, B]),
      ('crd', 'crd', method_crd, [A, B]),
      ('reviewkd', 'reviewkd', method_reviewkd, [A, B]),
      ('cc', 'cc', method_cc, [A, B]),
      ('ab', 'ab', method_ab, [A, B]),
      ('ft', 'ft', method_ft, [A, B]),
      ('fsp', 'fsp', method_fsp, [A]),
  ]
  return plan


def source_key(name):
  for k in ('kd_ls', 'dkd_ls', 'dist_ls', 'kdsvd_rd'):
    if name.startswith(k):
      return k
  return name.split('_epoch')[0]


class Ctx:
  def __init__(self, src, data, meta, rng, weights_seed, crd_n_data, crd_k):
    self.src, self.data, self.meta = src, data, meta
    self._rng_state = copy.deepcopy(rng.bit_generator.state)
    self.weights_seed = weights_seed
    self.crd_n_data, self.crd_k = crd_n_data, crd_k
    self.entries = None
    self._cache = {}

  def tensors(self, dtype):
    if dtype not in self._cache:
      self._cache[dtype] = tensors(self.data, dtype)
    return self._cache[dtype]

  def prepare_weights(self, module, dtype, entries=None):
    if entries is None:
      entries = connector_entries(module)
    if self.entries is None:
      self.entries = entries
    assert self.entries == entries
    fill_weights(module, self.weights_seed, entries)
    module.to(dtype)

  def state_after(self, r, module):
    for k, v in module.state_dict().items():
      if k.startswith(('student.', 'teacher.')):
        continue
      leaf = k.rsplit('.', 1)[-1]
      if leaf in ('running_mean', 'running_var', 'num_batches_tracked'):
        a = v.detach().numpy()
        r.arrays['state_after/' + k] = a if leaf == 'num_batches_tracked' else a.astype(np.float32)

  def crd_draws(self, n_data, k, feat_dim, batch):
    rng = np.random.default_rng()
    rng.bit_generator.state = copy.deepcopy(self._rng_state)
    # ContrastMemory.__init__: stdv = 1/sqrt(feat_dim/3); U(-stdv, stdv), not normalised.
    stdv = 1.0 / math.sqrt(feat_dim / 3)
    out = {'memory_s_before': f32(rng.uniform(-stdv, stdv, (n_data, feat_dim))),
           'memory_t_before': f32(rng.uniform(-stdv, stdv, (n_data, feat_dim)))}
    for suffix in ('', '2'):
      index = rng.choice(n_data, batch, replace=False).astype(np.int64)
      cidx = np.empty((batch, k + 1), np.int64)
      cidx[:, 0] = index  # mode 'exact': the positive is the sample itself
      for b in range(batch):
        others = np.setdiff1d(np.arange(n_data), [index[b]])
        cidx[b, 1:] = rng.choice(others, k, replace=False)
      out['index' + suffix] = index
      out['contrast_idx' + suffix] = cidx
    return out


def nhwc(a):
  return np.transpose(a, (0, 2, 3, 1)) if a.ndim == 4 else a


def compute(runner, ctx, dtype):
  r = runner(ctx, dtype)
  leaves = list(r.leaves.values())
  params = list(r.params.items())
  targets = leaves + [p for _, p in params]
  grads = torch.autograd.grad(r.kd_total, targets, allow_unused=True, retain_graph=True)
  out = {'losses': {k: scalar(v) if torch.is_tensor(v) else float(v) for k, v in r.losses.items()},
         'grad_student': {}, 'grad_weights': {}, 'grads_extra': {}, 'r': r}
  for name, g in zip(r.leaves.keys(), grads[:len(leaves)]):
    out['grad_student'][name] = (torch.zeros_like(r.leaves[name]) if g is None else g).detach().numpy()
  out['unused'] = []
  for (k, p), g in zip(params, grads[len(leaves):]):
    if g is None:  # not on loss/kd's path (e.g. FT's paraphraser decoder)
      out['unused'].append(k)
    else:
      out['grad_weights'][k] = g.detach().numpy()
  if r.all_leaves is not None:
    # Which student features the original really reads (has a gradient path from loss/kd).
    names = list(r.all_leaves)
    gs = torch.autograd.grad(r.kd_total, [r.all_leaves[n] for n in names], allow_unused=True,
                             retain_graph=True)
    used = {n for n, g in zip(names, gs) if g is not None}
    assert used == set(r.leaves), (sorted(used), sorted(r.leaves))
  for prefix, (loss, ps) in r.grads_extra.items():
    gs = torch.autograd.grad(loss, list(ps.values()), allow_unused=True)
    out['grads_extra'][prefix] = {k: (torch.zeros_like(p) if g is None else g).detach().numpy()
                                  for (k, p), g in zip(ps.items(), gs)}
  return out


def zero_gradients(res):
  """Weight-gradient keys whose float64 value is rounding noise around an exact zero."""
  scale = max([np.abs(g).max() for g in res['grad_weights'].values()] +
              [np.abs(g).max() for g in res['grad_student'].values()] + [0.0])
  return sorted('grad/weights/' + k for k, g in res['grad_weights'].items()
                if g.size and np.abs(g).max() <= 1e-12 * scale)


def rel(a, b):
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  nb = np.linalg.norm(b)
  na = np.linalg.norm(a - b)
  return float(na / nb) if nb > 0 else float(na)


LOSS_DESCRIPTIONS = {
    'ce': 'cross-entropy of student/logits against labels, times the original\'s CE weight '
          '(as the original\'s forward returns it; not part of the gradients)',
    'kd': 'the distillation term exactly as the original\'s forward returns it (all its '
          'weights, warm-up factors and temperature factors applied); the gradients are of '
          'this term',
    'kd_unweighted': 'loss/kd divided by the separable weight(s) named in the spec '
                     '(feature weight / kd weight / warm-up factor)',
}


UNWEIGHTED = {
    'kd': 'kd_loss(...) as returned (already times T^2), without KD.LOSS.KD_WEIGHT',
    'dkd': 'dkd_loss(...) = alpha*tckd + beta*nckd (already times T^2), without the '
           'warm-up factor min(epoch/warmup, 1)',
    'dist': 'DIST()(z_s, z_t) = beta*inter + gamma*intra (already times tau^2), without '
            'kd_loss_weight',
    'reviewkd': 'hcl_loss(results, teacher features), without REVIEWKD_WEIGHT and without '
                'the warm-up factor min(epoch/WARMUP_EPOCHS, 1)',
    'rkd': 'rkd_loss(...) = 25*distance + 50*angle, without FEAT_WEIGHT (which is 1)',
    'cc': 'Correlation()(embed_s(f_s), embed_t(f_t)), without beta',
    'ft': 'FactorTransfer()(factor_s, factor_t), without beta',
}


def describe_losses(name, losses, hyper, base=None):
  desc = {}
  for k in losses:
    if k in LOSS_DESCRIPTIONS:
      desc[k] = LOSS_DESCRIPTIONS[k]
  if 'kd_unweighted' in losses:
    desc['kd_unweighted'] = UNWEIGHTED.get(
        base, 'the criterion\'s value without the feature weight: loss/kd / FEAT_WEIGHT')
  extra = {
      'tckd': 'dkd_loss with alpha=1, beta=0 (target-class KD term, already times T^2, no '
              'warm-up factor)',
      'nckd': 'dkd_loss with alpha=0, beta=1 (non-target-class KD term, already times T^2, '
              'no warm-up factor)',
      'inter': 'tau^2 * inter_class_relation(softmax(z_s/tau), softmax(z_t/tau)) (unweighted)',
      'intra': 'tau^2 * intra_class_relation(softmax(z_s/tau), softmax(z_t/tau)) (unweighted)',
      'rkd_distance_unweighted': 'rkd_loss with distance_weight=1, angle_weight=0',
      'rkd_angle_unweighted': 'rkd_loss with distance_weight=0, angle_weight=1',
      'kd_with_float32_svd': 'loss/kd as the original really computes it: svd() casts to '
                             'float32 (KDSVD.py:167); loss/kd and the gradients were computed '
                             'with that cast disabled (float64 throughout)',
      'kd_step2': 'loss/kd of a second call with crd/step2/index and crd/step2/contrast_idx, '
                  'the same features, the memory left by the first call and the Z set by '
                  'the first call',
      'init_reconstruction': 'init stage: MSE(paraphraser decoder(encoder(teacher/stage3)), '
                             'teacher/stage3) (mean); its gradients are grad_init/weights/*',
  }
  for k in losses:
    if k in extra:
      desc[k] = extra[k]
    elif k.startswith('kd_stage'):
      desc[k] = f'ABLoss group term {k[-1]} (already times its stage weight, /batch, /1000*3)'
    elif k.startswith('kd_pair'):
      desc[k] = f'the criterion\'s term {k[-1]} of its returned list (loss/kd is their sum)'
  return desc


STATE_DESCRIPTIONS = [
    ('crd/index', 'int64 [B]: dataset indices of the batch (the memory rows updated)'),
    ('crd/contrast_idx', 'int64 [B, K+1]: column 0 = crd/index (mode exact), columns 1..K '
                         'the sampled negatives, passed explicitly to the original'),
    ('crd/memory_s_before', 'float32 [n_data, feat_dim]: ContrastMemory.memory_v1 (student '
                            'memory) before the call; U(-stdv, stdv), stdv = 1/sqrt(feat_dim/3)'),
    ('crd/memory_t_before', 'float32 [n_data, feat_dim]: ContrastMemory.memory_v2 (teacher '
                            'memory) before the call'),
    ('crd/memory_s_after', 'memory_v1 after the call (rows crd/index updated)'),
    ('crd/memory_t_after', 'memory_v2 after the call'),
    ('crd/Z_s', 'float64: params[2] = Z_v1, set on the first call to mean(out_v1) * n_data '
                '(out_v1: the student-anchor scores exp(memory_v2 . v1 / T))'),
    ('crd/Z_t', 'float64: params[3] = Z_v2 = mean(out_v2) * n_data on the first call'),
    ('crd/temperature', 'float64: params[1], the NCE temperature as used: float32(0.07)'),
    ('crd/embed_s', 'float32 [B, feat_dim]: embed_s(student/pooled) (L2-normalised)'),
    ('crd/embed_t', 'float32 [B, feat_dim]: embed_t(teacher/pooled) (L2-normalised)'),
    ('crd/step2/index', 'second call\'s indices'),
    ('crd/step2/contrast_idx', 'second call\'s [B, K+1] indices'),
    ('crd/step2/memory_s_after', 'memory_v1 after the second call'),
    ('crd/step2/memory_t_after', 'memory_v2 after the second call'),
    ('ofd/margin', 'float32 [C]: OFD\'s margin for that stage as the original uses it '
                   '(torch.FloatTensor, computed from teacher/bn_before_relu<i>)'),
    ('kdsvd/teacher_v', 'float32 [B, n, k]: the teacher\'s normalised right singular '
                        'vector(s) of that stage as torch (LAPACK) returns them; their sign '
                        'changes the loss (see sign_sensitivity)'),
    ('kdsvd/student_v_aligned', 'float32 [B, n, k]: the student\'s singular vector picked '
                                'and sign-aligned by align_rsv'),
    ('vid/log_scale', 'float32 [C_t]: the log_scale of that stage as used (its initial '
                      'value: mdistiller never registers or trains it)'),
    ('state_after/', 'BatchNorm running statistics after the forward in train mode '
                     '(momentum 0.1, unbiased batch variance); num_batches_tracked int64'),
]


def describe_state(k):
  for prefix, d in STATE_DESCRIPTIONS:
    if k.startswith(prefix):
      return d
  return ''


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--mdistiller', required=True)
  p.add_argument('--repdistiller', required=True)
  p.add_argument('--dist_kd', required=True)
  p.add_argument('--logit_std', required=True)
  p.add_argument('--out', required=True)
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--batch', type=int, default=8)
  p.add_argument('--crd_n_data', type=int, default=64)
  p.add_argument('--crd_k', type=int, default=16)
  p.add_argument('--only', default='', help='comma-separated file method names')
  p.add_argument('--no_float32_check', action='store_true')
  args = p.parse_args()
  if args.batch < 2:
    raise SystemExit('--batch must be >= 2 (relation methods)')

  src = Sources(args)
  os.makedirs(args.out, exist_ok=True)
  only = set(filter(None, args.only.split(',')))
  pair_cache = {}
  plan = file_plan()
  written = []
  for number, (name, base, runner, pairs) in enumerate(plan):
    if only and name not in only:
      continue
    for pair_number, pair in enumerate(sorted(PAIRS)):
      if pair not in pairs:
        continue
      if pair not in pair_cache:
        pair_cache[pair] = draw_pair(src, pair, args.seed, args.batch)
      data, meta, rng = pair_cache[pair]
      weights_seed = args.seed * 1000 + number * 10 + pair_number
      ctx = Ctx(src, data, meta, rng, weights_seed, args.crd_n_data, args.crd_k)
      src.paths = {}
      torch.manual_seed(args.seed)
      res = compute(runner, ctx, torch.float64)
      r = res['r']
      check = None
      if not args.no_float32_check:
        ctx32 = Ctx(src, data, meta, rng, weights_seed, args.crd_n_data, args.crd_k)
        res32 = compute(runner, ctx32, torch.float32)
        check = {'loss/' + k: rel(res32['losses'][k], v) for k, v in res['losses'].items()
                 if k in res32['losses']}
        for k, v in res['grad_student'].items():
          check['grad/student/' + k] = rel(res32['grad_student'][k], v)
        for k, v in res['grad_weights'].items():
          check['grad/weights/' + k] = rel(res32['grad_weights'][k], v)
        for k in zero_gradients(res):
          check[k] = 'true gradient is 0 (see zero_gradients)'
      s_read, t_read = FEATURES_READ[base]
      arrays = {'labels': data['labels'], 'student/logits': data['student/logits']}
      for f in s_read:
        arrays['student/' + f] = nhwc(data['student/' + f])
      for f in t_read:
        arrays['teacher/' + f] = nhwc(data['teacher/' + f])
      if base == 'ofd':
        for i in STAGES:
          for leaf in ('weight', 'bias'):
            k = f'teacher/bn_before_relu{i}/{leaf}'
            arrays[k] = data[k]
      for k, v in res['losses'].items():
        arrays['loss/' + k] = np.float64(v)
      for k, g in res['grad_student'].items():
        arrays['grad/student/' + k] = nhwc(g).astype(np.float32)
      slices = {}

      def put_weight_grad(prefix, k, g):
        if g.size > MAX_STORED_WEIGHT_GRAD:
          n = max(1, MAX_STORED_WEIGHT_GRAD // int(np.prod(g.shape[1:])))
          arrays[f'{prefix}_slice/' + k] = g[:n].astype(np.float32)
          slices[f'{prefix}_slice/' + k] = n
        else:
          arrays[f'{prefix}/' + k] = g.astype(np.float32)
      for k, g in res['grad_weights'].items():
        put_weight_grad('grad/weights', k, g)
      for prefix, gs in res['grads_extra'].items():
        for k, g in gs.items():
          put_weight_grad(f'{prefix}/weights', k, g)
      zero = zero_gradients(res)
      for k, v in r.arrays.items():
        arrays[k] = v
      teacher, student = PAIRS[pair]
      entries = ctx.entries or []
      hyper = r.spec.get('hyper', {})
      spec = {
          'method': name,
          'base_method': base,
          'source': {'repository': SOURCES[source_key(name)][0],
                     'file': SOURCES[source_key(name)][1],
                     'symbols': SOURCES[source_key(name)][2],
                     'files_sha256': {f'{repo}:{path}': h for (repo, path), h in sorted(src.paths.items())}},
          'hyper_parameters': hyper,
          'pair': {'teacher': teacher, 'student': student},
          'batch': args.batch,
          'seed': args.seed,
          'weights_seed': weights_seed,
          'weights_spec': [[k, list(s)] for k, s in entries],
          'features': {'student': s_read, 'teacher': t_read,
                       'convention': {'student': meta['student']['convention'],
                                      'teacher': meta['teacher']['convention']}},
          'module_mode': r.spec.get('module_mode', 'no connector modules'),
          'losses': describe_losses(name, res['losses'], hyper, base),
          'gradients': ('grad/student/<feature>: d loss/kd / d student feature (NHWC '
                        'float32); grad/weights/<key>: d loss/kd / d connector parameter '
                        '(torch layout, float32)'),
          'dtype': 'float64 computation from float32-representable inputs and weights',
          'torch_float32_vs_float64_relative_error': check,
      }
      if slices:
        spec['weight_grad_slices'] = {
            'note': (f'weight gradients with more than {MAX_STORED_WEIGHT_GRAD} elements are '
                     'stored as <prefix>_slice/<key> = gradient[:n] (first n slices along '
                     'dim 0 of the torch layout)'),
            'n': slices}
      if res['unused']:
        spec['parameters_without_gradient'] = {
            'keys': res['unused'],
            'note': 'not on the path of loss/kd (no grad/weights entry is stored for them)'}
      if zero:
        spec['zero_gradients'] = {
            'keys': zero,
            'note': ('mathematically zero gradients (a bias followed by a BatchNorm that '
                     'uses batch statistics): the stored values are float64 rounding noise '
                     '(~1e-17 relative); compare them with an absolute tolerance')}
      for k in ('repdistiller_at', 'sign_sensitivity', 'connector', 'connectors', 'note'):
        if k in r.spec:
          spec[k] = r.spec[k]
      extra_keys = sorted(k for k in r.arrays)
      if extra_keys:
        spec['state_keys'] = {k: describe_state(k) for k in extra_keys}
      if base == 'ofd':
        spec['features']['teacher_bn_before_relu'] = (
            'teacher/bn_before_relu<i>/weight, /bias (i = 1..3): the weight and bias of the '
            'teacher\'s get_bn_before_relu()[i-1] BatchNorm, from which OFD computes its '
            'margins (inputs, float32)')
      arrays['spec'] = np.array(json.dumps(spec, indent=1, sort_keys=False))
      fname = os.path.join(args.out, f'{name}__{teacher}__{student}.npz')
      np.savez_compressed(fname, **arrays)
      written.append(fname)
      print(f'{os.path.basename(fname)}: ' + ', '.join(
          f'{k}={v:.10g}' for k, v in res['losses'].items()), flush=True)
  print(f'{len(written)} files written to {args.out}')


if __name__ == '__main__':
  main()
