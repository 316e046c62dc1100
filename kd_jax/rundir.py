"""Run directories: naming, identity, refuse/restart/resume, atomic result files.

No JAX, no TensorFlow: kd_jax.report and the sweep's planning import only this (and a
test checks it). A run directory lives under --workdir and is named after its cell
(method, dataset, student, teacher, seed), so every run of a study shares one root and a
teacher is the baseline run of its model, reused by every student that needs it.
"""
import hashlib
import json
import os
from typing import Any, Dict, Optional

CONFIG_FILE, RESULT_FILE = 'config.json', 'result.json'
BASELINE = 'base'  # the one method without a teacher: what teachers are trained with
IF_CONFIG_DIFFERS = ('refuse', 'restart', 'resume')


def _as_dict(config) -> Dict[str, Any]:
  to_dict = getattr(config, 'to_dict', None)
  return json.loads(json.dumps(to_dict() if to_dict else config))


def needs_teacher(method: str) -> bool:
  return method != BASELINE


def run_name(config) -> str:
  """`<method>_<dataset>_<model>[_from_<teacher>]_seed<seed>[_<tag>]`, or config.name."""
  if config.name:
    return config.name
  name = f'{config.method}_{config.dataset}_{config.model}'
  if needs_teacher(config.method):
    name += f'_from_{config.teacher.model}'
  name += f'_seed{config.seed}'
  return f'{name}_{config.tag}' if config.tag else name


def run_identity(config) -> Dict[str, Any]:
  """The settings that decide a run's result (of a ConfigDict or its saved JSON):
  where the data lives, what the run directory is called, how often it checkpoints or
  dispatches, how many seeds train beside it and whether a teacher may be trained on
  demand do not."""
  identity = _as_dict(config)
  for key in ('data_dir', 'name', 'checkpoint_every_steps', 'steps_per_dispatch', 'num_seeds'):
    identity.pop(key, None)
  if needs_teacher(identity['method']):
    identity['teacher'].pop('auto_train', None)
  else:
    identity.pop('teacher', None)
    identity.pop('distill', None)
  return identity


def config_hash(config) -> str:
  blob = json.dumps(run_identity(config), sort_keys=True).encode()
  return hashlib.sha256(blob).hexdigest()[:16]


def check_run_dir(run_dir: str, config, if_config_differs: str = 'refuse') -> Optional[str]:
  """Refuses a run directory that holds another run (a different config), unless told
  to restart (returns 'restart') or to resume with the new config (returns 'resume').
  A run written before kd_jax's `distill` config sections (it has `kd`) is refused."""
  if if_config_differs not in IF_CONFIG_DIFFERS:
    raise ValueError(f'if_config_differs={if_config_differs!r} is not accepted; expected one '
                     f'of: {", ".join(IF_CONFIG_DIFFERS)}')
  saved_path = os.path.join(run_dir, CONFIG_FILE)
  if os.path.exists(saved_path):
    with open(saved_path) as f:
      saved_config = json.load(f)
    if 'kd' in saved_config and 'distill' not in saved_config:
      raise ValueError(f'run directory {run_dir!r} was written by an earlier kd_jax (config '
                       "section 'kd', now 'distill.<method>'); it cannot be resumed: choose "
                       'another --workdir or --config.name, or pass --if_config_differs=restart')
    saved, new = run_identity(saved_config), run_identity(config)
    differ = sorted(k for k in set(saved) | set(new) if saved.get(k) != new.get(k))
    if differ and if_config_differs == 'refuse':
      raise ValueError(f'run directory {run_dir!r} holds a run with another config '
                       f'(differs in: {", ".join(differ)}); choose another --config.name or '
                       '--workdir, or pass --if_config_differs=restart (the old run is kept '
                       'beside it) or =resume (continue it with the new config)')
    return if_config_differs if differ else None
  elif os.path.isdir(run_dir) and os.listdir(run_dir):
    raise ValueError(f'run directory {run_dir!r} exists and is not a kd_jax run; '
                     'choose another --config.name or --workdir')
  return None


def check_writable(workdir: str):
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ValueError(f'workdir {workdir!r} exists and is not a directory')
  parent = workdir
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.access(parent, os.W_OK | os.X_OK):
    raise ValueError(f'workdir {workdir!r} is not writable ({parent!r} is read-only)')


def write_json_atomic(path: str, obj):
  tmp = f'{path}.tmp'
  with open(tmp, 'w') as f:
    json.dump(obj, f, indent=2)
  os.replace(tmp, path)


def read_result(run_dir: str) -> Optional[Dict[str, Any]]:
  path = os.path.join(run_dir, RESULT_FILE)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)
