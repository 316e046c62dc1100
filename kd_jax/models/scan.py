"""Scanned and unrolled layouts of a stage's repeated blocks.

A family that scans names block j of stage s `<stage>_<j>` in the unrolled layout and
blocks 1..n-1 `<stage>_blocks` (stacked on a leading axis, block j at index j-1) in the
scanned one; block 0 stays `<stage>_0`. Only top-level modules are renamed. A family
that scans must not name other top-level modules `<name>_<digits>`.
"""
import operator
import re

import jax
import jax.numpy as jnp
import numpy as np

# The collections a scanned stage stacks (leading axis: block); the models have no others.
SCANNED_COLLECTIONS = ('params', 'batch_stats')

_BLOCK = re.compile(r'(\w+?)_(\d+)')
_STACKED = re.compile(r'(\w+)_blocks')


def _stack(leaves):
  # numpy stays numpy, keeping float64 whatever jax's x64 setting; the rest goes to jax.
  return np.stack(leaves) if all(isinstance(a, np.ndarray) for a in leaves) else jnp.stack(leaves)


def _per_collection(fn, variables):
  return {c: fn(tree) if c in SCANNED_COLLECTIONS else tree for c, tree in variables.items()}


def stack_blocks(variables):
  """Unrolled layout -> scanned: `<stage>_<j>` for j >= 1 become `<stage>_blocks`.

  Takes {'params', 'batch_stats'} or any part of them; other collections, block 0,
  and variables already in the scanned layout pass through unchanged.
  """
  def stack(modules):
    out, stages = {}, {}
    for name, tree in modules.items():
      m = _BLOCK.fullmatch(name)
      if m and int(m[2]) > 0:
        out.setdefault(f'{m[1]}_blocks', None)  # where the stage's block 1 was
        stages.setdefault(f'{m[1]}_blocks', {})[int(m[2])] = tree
      else:
        out[name] = tree
    for name, blocks in stages.items():
      out[name] = jax.tree.map(lambda *xs: _stack(xs), *(blocks[j] for j in sorted(blocks)))
    return out

  return _per_collection(stack, variables)


def unstack_blocks(variables):
  """Scanned layout -> unrolled, the inverse of stack_blocks."""
  def unstack(modules):
    out = {}
    for name, tree in modules.items():
      m = _STACKED.fullmatch(name)
      if m:
        for i in range(len(jax.tree.leaves(tree)[0])):
          out[f'{m[1]}_{i + 1}'] = jax.tree.map(operator.itemgetter(i), tree)
      else:
        out[name] = tree
    return out

  return _per_collection(unstack, variables)


def to_layout_of(variables, template):
  """`variables` (either layout) in the layout of `template`: scanned where it has
  `<stage>_blocks` modules, unrolled otherwise."""
  scanned = any(_STACKED.fullmatch(name)
                for c in SCANNED_COLLECTIONS for name in template.get(c, {}))
  return stack_blocks(variables) if scanned else unstack_blocks(variables)
