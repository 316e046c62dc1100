"""Weights for golden vectors, made from a seed by numpy alone.

The zoo's and the methods' golden vectors (tests/data/zoo, tests/data/methods) come from
PyTorch models far too large to store (ResNet50 has 23.5M parameters). Their generators
fill every state_dict entry with `state_dict_values(seed, entries)` and store only the
seed and the entries' names and shapes; the tests make the same arrays again here, so a
vector file holds the inputs and outputs, not the weights. numpy's PCG64 streams are
stable across platforms and versions, so the same seed gives the same bits everywhere.

Needs only numpy: the generators (torch) and the tests (JAX) both import it.
"""
import math
from typing import Iterable, Sequence, Tuple

import numpy as np


def state_dict_values(seed: int, entries: Iterable[Tuple[str, Sequence[int]]]) -> dict:
  """float32 arrays for (state_dict key, shape) pairs, drawn in the order given.

  Scales keep activations of order one through deep nets in both BatchNorm modes:
  conv and linear weights N(0, 2 / fan_in) (fan_in = the product of all but the first
  dimension, PyTorch's layout), BatchNorm weights U(0.5, 1.5), biases and running means
  N(0, 0.1^2), running variances U(0.5, 1.5). `num_batches_tracked` is int64 zero.
  """
  rng = np.random.default_rng(seed)
  out = {}
  for key, shape in entries:
    shape = tuple(int(s) for s in shape)
    leaf = key.rsplit('.', 1)[-1]
    if leaf == 'num_batches_tracked':
      out[key] = np.zeros(shape, np.int64)
      continue
    if leaf == 'running_var' or (leaf == 'weight' and len(shape) == 1):
      value = rng.uniform(0.5, 1.5, shape)
    elif leaf == 'weight' and len(shape) >= 2:
      fan_in = math.prod(shape[1:])
      value = rng.normal(0.0, math.sqrt(2.0 / fan_in), shape)
    else:  # biases, running means, anything else
      value = rng.normal(0.0, 0.1, shape)
    out[key] = value.astype(np.float32)
  return out


def images(seed: int, batch_size: int, shape=(32, 32, 3)) -> np.ndarray:
  """A normalised-looking input batch, float32 NHWC, N(0, 1)."""
  return np.random.default_rng(seed).normal(0.0, 1.0, (batch_size, *shape)).astype(np.float32)
