#!/usr/bin/env python3
"""Golden vectors for the CIFAR model zoo of megvii-research/mdistiller.

Runs mdistiller's own PyTorch model definitions (read from a checkout given with
--mdistiller; nothing of them is copied here) on weights made by tests/golden.py and
writes one <name>.npz per model: the input batch, eval- and train-mode outputs
(logits, every `feats` / `preact_feats` entry, `pooled_feat`) and the BatchNorm running
statistics after the train-mode forward. See README.md next to this file.

  pip install torch numpy
  python tests/data/zoo/generate_zoo.py --mdistiller /path/to/mdistiller \
      --out tests/data/zoo [--seed 0] [--batch 2] [--names resnet8,wrn_16_1]

Only the model files (mdistiller/models/cifar/<file>.py) are imported, each on its
own, so mdistiller's package __init__ and its dependencies (yacs, ...) are not needed.
The name -> constructor table is read from mdistiller/models/cifar/__init__.py
(`cifar_model_dict`) by parsing it, not executing it.
"""
import argparse
import ast
import contextlib
import importlib.util
import io
import json
import os
import sys
import time

import numpy as np
import torch
import torch.nn as nn

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))))
if _REPO_ROOT not in sys.path:
  sys.path.insert(0, _REPO_ROOT)
from tests.golden import images, state_dict_values  # noqa: E402

NUM_CLASSES = 100
# The order of cifar_model_dict's keys in the brief (teachers and students mixed).
DEFAULT_NAMES = [
    'resnet8', 'resnet14', 'resnet20', 'resnet32', 'resnet44', 'resnet56', 'resnet110',
    'resnet8x4', 'resnet32x4', 'wrn_16_1', 'wrn_16_2', 'wrn_40_1', 'wrn_40_2', 'vgg8',
    'vgg11', 'vgg13', 'vgg16', 'vgg19', 'MobileNetV2', 'ShuffleV1', 'ShuffleV2',
    'ResNet18', 'ResNet50',
]


def _cifar_dir(mdistiller):
  """The folder holding the CIFAR model files, from a checkout's root (or deeper)."""
  for cand in (os.path.join(mdistiller, 'mdistiller', 'models', 'cifar'),
               os.path.join(mdistiller, 'models', 'cifar'), mdistiller):
    if os.path.isfile(os.path.join(cand, '__init__.py')) and os.path.isfile(
        os.path.join(cand, 'resnet.py')):
      return os.path.abspath(cand)
  raise SystemExit(f'no mdistiller/models/cifar under {mdistiller!r}')


def _model_table(cifar_dir):
  """{name: (module file stem, constructor name)} from cifar_model_dict, parsed."""
  with open(os.path.join(cifar_dir, '__init__.py')) as f:
    tree = ast.parse(f.read())
  where = {}  # constructor -> module
  table = {}
  for node in tree.body:
    if isinstance(node, ast.ImportFrom) and node.level == 1:
      for alias in node.names:
        where[alias.asname or alias.name] = (node.module, alias.name)
    elif (isinstance(node, ast.Assign) and len(node.targets) == 1 and
          isinstance(node.targets[0], ast.Name) and
          node.targets[0].id == 'cifar_model_dict'):
      for key, value in zip(node.value.keys, node.value.values):
        table[key.value] = value.elts[0].id
  return {name: where[fn] for name, fn in table.items()}


_MODULES = {}


def _load_module(cifar_dir, stem):
  if stem not in _MODULES:
    path = os.path.join(cifar_dir, stem + '.py')
    spec = importlib.util.spec_from_file_location(f'_mdistiller_cifar_{stem}', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    _MODULES[stem] = module
  return _MODULES[stem]


def _build(constructor):
  # mobile_half prints "6 0.5" from MobileNetV2.__init__; keep the log readable.
  with contextlib.redirect_stdout(io.StringIO()):
    return constructor(num_classes=NUM_CLASSES)


def _nhwc(t):
  a = t.detach().cpu().numpy()
  if a.ndim == 4:
    a = a.transpose(0, 2, 3, 1)
  return np.ascontiguousarray(a)


def _module_names(model, modules):
  ids = {id(m): n for n, m in model.named_modules()}
  return [ids[id(m)] for m in modules]


def generate(name, stem_fn, cifar_dir, seed, batch, out_dir):
  stem, fn_name = stem_fn
  constructor = getattr(_load_module(cifar_dir, stem), fn_name)
  probe = _build(constructor)
  entries = [(k, list(v.shape)) for k, v in probe.state_dict().items()]
  values = state_dict_values(seed, entries)
  num_params = sum(p.numel() for p in probe.parameters())

  def fresh():
    model = _build(constructor)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in values.items()},
                          strict=True)
    return model.double()

  x = images(seed + 1, batch)
  x_t = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous().double()

  out = {
      'name': np.array(name),
      'num_classes': np.array(NUM_CLASSES, np.int64),
      'seed': np.array(seed, np.int64),
      'batch_size': np.array(batch, np.int64),
      'num_params': np.array(num_params, np.int64),
      'state_spec': np.array(json.dumps(entries)),
      'x': x,
  }
  # Extras (not outputs): the model's own answers to get_stage_channels() and
  # get_bn_before_relu() (as module names), JSON; "null" where the model raises.
  try:
    stage_channels = [int(c) for c in probe.get_stage_channels()]
  except (AttributeError, NotImplementedError):
    stage_channels = None
  try:
    bn_before_relu = _module_names(probe, probe.get_bn_before_relu())
  except NotImplementedError:
    bn_before_relu = None
  out['stage_channels'] = np.array(json.dumps(stage_channels))
  out['bn_before_relu'] = np.array(json.dumps(bn_before_relu))

  shapes = {}
  stats = {}
  for mode in ('eval', 'train'):
    model = fresh()
    model.train(mode == 'train')
    with torch.no_grad():
      logits, feats = model(x_t)
    outs = {'logits': logits, 'pooled': feats['pooled_feat'], 'stem': feats['feats'][0]}
    for i in range(1, len(feats['feats'])):
      outs[f'stage{i}'] = feats['feats'][i]
    if 'preact_feats' in feats:
      for i in range(1, len(feats['preact_feats'])):
        outs[f'preact_stage{i}'] = feats['preact_feats'][i]
    for key, t in outs.items():
      assert t.dtype == torch.float64, (name, key, t.dtype)
      a = _nhwc(t)
      stats[f'{mode}/{key}'] = (bool(np.isfinite(a).all()), float(np.abs(a).max()))
      out[f'{mode}/{key}'] = a.astype(np.float32)
      shapes[key] = a.shape
    if mode == 'train':
      for mname, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
          out[f'after_train/{mname}.running_mean'] = m.running_mean.numpy().astype(
              np.float32)
          out[f'after_train/{mname}.running_var'] = m.running_var.numpy().astype(
              np.float32)
          out[f'after_train/{mname}.num_batches_tracked'] = (
              m.num_batches_tracked.numpy().astype(np.int64))

  path = os.path.join(out_dir, f'{name}.npz')
  np.savez_compressed(path, **out)
  return path, num_params, shapes, stats, stage_channels, bn_before_relu


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--mdistiller', required=True,
                 help='a checkout of megvii-research/mdistiller (its root)')
  p.add_argument('--out', default=os.path.dirname(os.path.abspath(__file__)))
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--batch', type=int, default=2)
  p.add_argument('--names', default=','.join(DEFAULT_NAMES),
                 help='comma-separated cifar_model_dict keys')
  p.add_argument('--summary', default=None,
                 help='optional JSON file for per-name shapes, sizes and checks')
  args = p.parse_args(argv)

  cifar_dir = _cifar_dir(args.mdistiller)
  table = _model_table(cifar_dir)
  names = [n for n in args.names.split(',') if n]
  unknown = [n for n in names if n not in table]
  if unknown:
    raise SystemExit(f'not in cifar_model_dict: {unknown}; known: {sorted(table)}')
  os.makedirs(args.out, exist_ok=True)
  torch.set_grad_enabled(False)

  summary = {}
  total = 0
  t_all = time.time()
  for name in names:
    t0 = time.time()
    path, num_params, shapes, stats, stage_channels, bn_before_relu = generate(
        name, table[name], cifar_dir, args.seed, args.batch, args.out)
    size = os.path.getsize(path)
    total += size
    bad = [k for k, (finite, mx) in stats.items() if not finite or mx > 1e4]
    print(f'{name:12s} {size / 1e6:7.3f} MB  params {num_params:>10,d}  '
          f'{time.time() - t0:6.1f}s  max|out| '
          f'{max(mx for _, mx in stats.values()):.3g}'
          + (f'  SUSPICIOUS: {bad}' if bad else ''), flush=True)
    summary[name] = dict(file=os.path.basename(path), bytes=size, num_params=num_params,
                         shapes={k: list(v) for k, v in shapes.items()},
                         max_abs={k: mx for k, (_, mx) in stats.items()},
                         all_finite=all(f for f, _ in stats.values()),
                         stage_channels=stage_channels, bn_before_relu=bn_before_relu)
  print(f'total {total / 1e6:.3f} MB in {len(names)} files, {time.time() - t_all:.1f}s')
  if args.summary:
    with open(args.summary, 'w') as f:
      json.dump(summary, f, indent=1)


if __name__ == '__main__':
  main()
