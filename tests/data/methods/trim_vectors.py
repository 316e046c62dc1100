"""Trims generated method vector files in place so they can be committed small.

Weight gradients (grad/weights*, grad_init/weights*) keep their first rows along dim 0
(at most LIMIT elements; stored as <prefix>_slice/<key>, counts in
spec.weight_grad_slices.n) and 4-d student gradients keep the first example. Tests compare
what is stored: their own full gradient's leading part.

  python tests/data/methods/trim_vectors.py tests/data/methods/{reviewkd,ab,ft,fsp}__*.npz
"""
import json
import sys

import numpy as np

LIMIT = 4096
PREFIXES = ('grad/weights/', 'grad/weights_slice/', 'grad_init/weights/',
            'grad_init/weights_slice/')


def trim(path):
  with np.load(path) as f:
    z = {k: f[k] for k in f.files}
  spec = json.loads(str(z['spec']))
  slices = dict(spec.get('weight_grad_slices') or {'note': 'first n slices along dim 0'})
  slices['n'] = dict(slices.get('n', {}))
  out = {}
  for key, value in z.items():
    prefix = next((p for p in PREFIXES if key.startswith(p)), None)
    if prefix is not None and value.size > LIMIT:
      n = max(1, LIMIT // (value.size // value.shape[0]))
      new_key = prefix.rstrip('/').removesuffix('_slice') + '_slice/' + key[len(prefix):]
      out[new_key] = value[:n]
      slices['n'].pop(key, None)
      slices['n'][new_key] = n
    elif key.startswith('grad/student/') and value.ndim == 4:
      out[key] = value[:1]
    else:
      out[key] = value
  spec['weight_grad_slices'] = slices
  spec['note'] = (spec.get('note') or '') + (
      f' Trimmed by trim_vectors.py: weight gradients to their first rows (<= {LIMIT} '
      'elements), 4-d student gradients to the first example.')
  out['spec'] = np.asarray(json.dumps(spec))
  np.savez_compressed(path, **out)


if __name__ == '__main__':
  for p in sys.argv[1:]:
    trim(p)
