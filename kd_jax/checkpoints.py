"""Orbax checkpoints of a run directory.

- `checkpoints/`: the latest train state and the loop's bookkeeping (epoch, best
  accuracy, history), for resuming; one kept (two for runs trained together).
- `init_stage/`: the same for a run's init stage (kd_jax.train), until the main stage
  has saved its first checkpoint.
- `best/`: the student's variables ({'params', 'batch_stats'}) at its best test
  accuracy, with what a later user of them needs to check them (model, dataset,
  number of classes); this is what a distillation run loads as its teacher.

Orbax writes each checkpoint to a temporary directory and renames it when complete,
so an interrupted save never leaves a checkpoint that looks valid.
"""
import os
import shutil
from typing import Any, List, Mapping, Optional, Tuple

import jax
import orbax.checkpoint as ocp

LATEST, BEST, INIT_STAGE = 'checkpoints', 'best', 'init_stage'


class CheckpointError(RuntimeError):
  """A checkpoint could not be written (disk full, no permission, ...)."""


def _manager(directory: str, read_only: bool = False, keep: int = 1) -> ocp.CheckpointManager:
  # Synchronous saves: a CIFAR ResNet's state writes in a fraction of a second, and two
  # managers saving the same step asynchronously can cross their barriers between
  # processes (seen as a hang with two processes).
  return ocp.CheckpointManager(
      os.path.abspath(directory),  # orbax wants absolute paths
      options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=not read_only,
                                           read_only=read_only,
                                           enable_async_checkpointing=False))


def has_best(run_dir: str) -> bool:
  path = os.path.join(run_dir, BEST)
  return os.path.isdir(path) and _manager(path, read_only=True).latest_step() is not None


def saved_steps(run_dir: str, latest: str = LATEST) -> List[int]:
  """The steps of `run_dir`'s latest checkpoints (none when it has none); `latest`:
  their subdirectory (INIT_STAGE for the init stage's)."""
  path = os.path.join(run_dir, latest)
  if not os.path.isdir(path):
    return []
  with _manager(path, read_only=True) as manager:
    return sorted(manager.all_steps())


def remove_init_stage(run_dir: str):
  """Deletes the init stage's checkpoints, once the main stage holds its result."""
  path = os.path.join(run_dir, INIT_STAGE)
  if jax.process_index() == 0 and os.path.isdir(path):
    shutil.rmtree(path)


def restore_best(run_dir: str) -> Tuple[Mapping[str, Any], dict]:
  """(variables, metadata) of the best checkpoint of `run_dir`, as saved."""
  with _manager(os.path.join(run_dir, BEST), read_only=True) as manager:
    step = manager.latest_step()
    if step is None:
      raise ValueError(f'no best checkpoint in {run_dir!r}')
    restored = manager.restore(step, args=ocp.args.Composite(
        variables=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()))
  return restored['variables'], restored['meta']


class RunCheckpoints:
  """The latest (`keep` of them, in subdirectory `latest`) and best checkpoints of one
  run directory; the init stage's (latest=INIT_STAGE) have no best."""

  def __init__(self, run_dir: str, keep: int = 1, latest: str = LATEST):
    self.latest = _manager(os.path.join(run_dir, latest), keep=keep)
    self.best = _manager(os.path.join(run_dir, BEST)) if latest == LATEST else None

  def restore_latest(self, abstract_state) -> Optional[Tuple[Any, dict]]:
    """(state, bookkeeping) of the latest checkpoint, or None when there is none."""
    step = self.latest.latest_step()
    if step is None:
      return None
    restored = self.latest.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    return restored['state'], restored['meta']

  def discard_after(self, step: int) -> List[int]:
    """Deletes the latest checkpoints after `step` (to go back to it); returns their steps."""
    later = [s for s in self.latest.all_steps() if s > step]
    for s in later:
      self.latest.delete(s)
    return later

  # Saved as host (numpy) copies: the state pmap returns is one device's copy on each
  # process, which orbax cannot write as a global array from several processes.
  def save_latest(self, step: int, state, meta: Mapping):
    self._save(self.latest, step, state=ocp.args.StandardSave(jax.device_get(state)),
               meta=ocp.args.JsonSave(dict(meta)))

  def save_best(self, step: int, variables, meta: Mapping):
    self._save(self.best, step, variables=ocp.args.StandardSave(jax.device_get(variables)),
               meta=ocp.args.JsonSave(dict(meta)))

  @staticmethod
  def _save(manager, step, **items):
    try:
      if step in manager.all_steps():
        # Redone after a crash between this save and the next latest one: replace it.
        manager.delete(step)
      manager.save(step, args=ocp.args.Composite(**items))
    except OSError as e:
      raise CheckpointError(f'cannot save the checkpoint of step {step} in {manager.directory}: '
                            f'{e.strerror or e}; the previous checkpoint is intact') from e

  def close(self):
    self.latest.close()
    if self.best is not None:
      self.best.close()


def abstract(tree):
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
