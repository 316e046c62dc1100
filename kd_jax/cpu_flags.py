"""XLA:CPU's convolution choice, set before JAX starts its CPU backend.

jaxlib 0.10 and 0.11 hand convolutions to YNNPACK by default. On this project's models
that is slower than XLA's own (Eigen) convolutions: on a 2-core x86 CPU, batch 128, a
32- or 64-channel 3x3 forward convolution took 2.9-3.6 ms against 1.6-1.9 ms, and a
stride-2 convolution's input gradient 14.5 ms against 3.3 ms. YNNPACK keeps the
reductions (BatchNorm statistics), where it is 2-4x faster than XLA's own. A ResNet-20
`st` train step went from 318 to 354 images/s on that machine.

`apply()` adds `--xla_cpu_experimental_ynn_fusion_type=-individual_convolution` to
XLA_FLAGS unless XLA_FLAGS already sets that option (a user's choice wins) or jaxlib is
a version not known to have it (XLA stops at an unknown flag). XLA reads XLA_FLAGS
when the first backend starts, so this must run before any JAX computation; importing
kd_jax does it. Other backends ignore xla_cpu_* flags.
"""
import importlib.metadata
import os

OPTION = 'xla_cpu_experimental_ynn_fusion_type'
FLAG = f'--{OPTION}=-individual_convolution'
# jaxlib versions whose XLA has OPTION (checked in the 0.10.2 and 0.11.2 wheels).
KNOWN_JAXLIB = ((0, 10), (0, 11))


def _jaxlib_version():
  try:
    return tuple(int(p) for p in importlib.metadata.version('jaxlib').split('.')[:2])
  except (importlib.metadata.PackageNotFoundError, ValueError):
    return None


def apply():
  """Adds FLAG to os.environ['XLA_FLAGS'] where it applies; returns whether it did."""
  flags = os.environ.get('XLA_FLAGS', '')
  if OPTION in flags or _jaxlib_version() not in KNOWN_JAXLIB:
    return False
  os.environ['XLA_FLAGS'] = f'{flags} {FLAG}'.strip()
  return True
