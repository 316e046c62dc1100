"""`base`: no distillation, cross-entropy only (how teachers are trained)."""
from kd_jax import methods


def _no_terms(cfg, student, teacher, batch, progress):
  del cfg, student, teacher, batch, progress
  return {}


BASE = methods.register(methods.Method(
    name='base', doc='Cross-entropy only: the baseline, and how teachers are trained.',
    build=methods.pure(_no_terms), needs_teacher=False, teacher_bn_mode='batch'))
