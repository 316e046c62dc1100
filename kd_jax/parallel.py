"""Data parallelism: every local device through jax.pmap, several hosts through
jax.distributed. This is the only module that knows about devices.

The train state and the teacher's variables are not replicated by hand: pmap
broadcasts them (`in_axes=None`) and returns one copy (`out_axes=None`). That copy is
right only because everything the steps return agrees on every device: gradients
and metrics are pmean'd, evaluation sums psum'd, and BatchNorm statistics are taken
over the global batch (models get `axis_name=AXIS`), so N devices compute what one
device computes on the whole batch.

`jax.pmap` is in maintenance mode in current JAX and runs on `shard_map` since JAX 0.8.
"""
import functools
from typing import Callable, Optional

import jax
import jax.numpy as jnp

AXIS = 'batch'


def initialize_distributed(coordinator_address: Optional[str] = None,
                           num_processes: Optional[int] = None,
                           process_id: Optional[int] = None, auto: bool = False):
  """Joins a multi-process run; with `auto`, JAX finds the cluster (SLURM, TPU, ...)."""
  if coordinator_address is None and not auto:
    return
  # Collectives between processes on the CPU backend (tests, CPU clusters) need gloo;
  # other backends ignore this.
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id)


def check_divisible(name: str, global_batch_size: int):
  """A global batch must split evenly over every device of every process."""
  n = jax.device_count()
  if global_batch_size % n:
    raise ValueError(f'config.{name}={global_batch_size} is not divisible by the {n} devices; '
                     f'use a multiple of {n}')


def shard(batch, axis: int = 0):
  """Splits axis `axis` (the local batch) over the local devices: [..., local batch, ...]
  -> [..., local devices, local batch / local devices, ...]."""
  n = jax.local_device_count()
  return jax.tree.map(
      lambda x: x.reshape(*x.shape[:axis], n, x.shape[axis] // n, *x.shape[axis + 1:]), batch)


def replicate(tree):
  """A copy of `tree` on every local device, stacked [local devices, ...], for an
  argument that `device_parallel` maps with in_axes 0 (e.g. a dataset kept on the
  devices): transferred once, not at every call as a broadcast argument would be."""
  return _broadcast(tree, out_axes=0)


def like_outputs(tree):
  """`tree` as `device_parallel` returns outputs: committed arrays replicated over the
  devices, Python scalars made arrays. A fresh or restored train state differs (an int
  step, uncommitted or single-device arrays), so a dispatch fed it would compile a
  program that the next dispatch, fed that dispatch's outputs, compiles again."""
  return _broadcast(tree, out_axes=None)


def _broadcast(tree, out_axes):
  """`tree` broadcast to every local device by an identity pmap, returned per out_axes.
  The pmap is named AXIS, as device_parallel's are: the arrays' sharding names the axis,
  and a dispatch fed another name compiles again."""
  n = jax.local_device_count()
  return jax.pmap(lambda _, x: x, axis_name=AXIS, in_axes=(0, None), out_axes=out_axes)(
      jnp.arange(n), tree)


def device_parallel(fn: Callable, in_axes, donate_argnums=()):
  """pmap of fn(*args, axis_name=AXIS) returning one copy of its (reduced) outputs.
  in_axes: None for a broadcast argument, 0 for a `replicate`d one, 1 for stacked
  host batches [K, local batch, ...] split over the local devices (see `shard`)."""
  return jax.pmap(functools.partial(fn, axis_name=AXIS), axis_name=AXIS, in_axes=in_axes,
                  out_axes=None, donate_argnums=donate_argnums)


def data_parallel(step: Callable, num_broadcast_args: int = 0, donate_state: bool = False):
  """pmap of step(state, batch, *broadcast_args, axis_name=AXIS) taking and returning
  unreplicated values: state and the other arguments are broadcast, the batch is
  split over the local devices. `step` must reduce what it returns over AXIS."""
  mapped = jax.pmap(functools.partial(step, axis_name=AXIS), axis_name=AXIS,
                    in_axes=(None, 0) + (None,) * num_broadcast_args, out_axes=None,
                    donate_argnums=(0,) if donate_state else ())

  def run(state, batch, *broadcast_args):
    return mapped(state, shard(batch), *broadcast_args)

  return run
