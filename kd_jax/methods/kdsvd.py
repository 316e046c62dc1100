"""`kdsvd`: self-supervised KD with singular value decomposition (Lee et al., ECCV 2018) as
mdistiller's distillers/KDSVD.py codes it, or RepDistiller's distiller_zoo/KDSVD.py with
`form='repdistiller'`.

Per stage (stage1..3), each sample's feature map becomes a matrix whose leading right
singular vectors are kept (teacher: k, student: k + 3); the student vector with the
largest |cosine| to the teacher's is kept, sign-aligned (a constant mask); for consecutive
stages an RBF kernel exp(-(v_i - v_j)^2 / 8) between the two stages' vectors is compared,
sum of squares over the batch mean. The two forms differ in the matrix:
- mdistiller: [C*H, W] of the NCHW map (singular vectors over the image width; the SVD
  in float32, as its `.float()` casts), needs equal widths for student and teacher;
- RepDistiller: [H*W, C] (singular vectors over channels, input dtype), needs equal
  channel counts.
The teacher's singular-vector signs are not resolved by either original (the loss depends
on them; tests/data/methods/README.md): kd_jax makes each teacher vector's largest entry
positive, and `teacher_reference` lets a test fix the signs to the original's (torch's).
The vectors come from linalg.eigh (Jacobi in plain XLA operations), not an SVD library
call: see the _right_vectors docstring.
"""
import jax
import jax.numpy as jnp

from kd_jax import linalg, methods
from kd_jax.methods.common import wide

STAGES = ('stage1', 'stage2', 'stage3')
FORMS = ('mdistiller', 'repdistiller')


def _normalize(x, axis):
  """F.normalize: x / max(||x||, 1e-12), with a zero gradient of the norm at 0."""
  sq = jnp.sum(x * x, axis=axis, keepdims=True)
  norm = jnp.where(sq > 0, jnp.sqrt(jnp.where(sq > 0, sq, 1.0)), 0.0)
  return x / jnp.maximum(norm, 1e-12)


def _finite(x):
  return jnp.where(jnp.isfinite(x), x, 0.0)


def _matrix(f, form):
  """The per-sample matrix the form decomposes, from an NHWC map."""
  b, h, w, c = f.shape
  if form == 'mdistiller':
    # NCHW .view(B, C*H, W), computed in float32 as the original's .float() does.
    return jnp.transpose(f, (0, 3, 1, 2)).reshape(b, c * h, w).astype(jnp.float32)
  return wide(f).reshape(b, h * w, c)  # NCHW .view(B, C, H*W).transpose(-2, -1)


def _right_vectors(f, n, form):
  """The first n right singular vectors of each sample's matrix M, normalised [B, D, n],
  and the singular values, normalised [B, n]. The originals call torch.svd; here they are
  the eigenvectors of the smaller of M^T M and M M^T (then M^T u), largest first
  (linalg.eigh: plain XLA operations, with the analytic gradient): the same vectors up
  to sign, and the same gradient."""
  m = _matrix(f, form)
  rows, cols = m.shape[1:]
  if rows < cols and rows >= n:
    w, u = linalg.eigh(jnp.einsum('bij,bkj->bik', m, m))
    v = jnp.einsum('bij,bin->bjn', m, u[:, :, :n])
  else:
    w, v = linalg.eigh(jnp.einsum('bij,bik->bjk', m, m))
    v = v[:, :, :n]
  s = jnp.sqrt(jnp.maximum(w[:, :n], 0))
  return _normalize(_finite(v), 1), _normalize(_finite(s), 1)


def _sign_of_largest(v):
  """+-1 per vector [B, 1, n]: the sign that makes its largest-magnitude entry positive.
  Neither original fixes the teacher's signs (they are whatever the backend's SVD
  returns, and the loss depends on them); kd_jax fixes them this way, on every backend."""
  top = jnp.take_along_axis(v, jnp.argmax(jnp.abs(v), axis=1, keepdims=True), axis=1)
  return jnp.where(top < 0, -1.0, 1.0).astype(v.dtype)


def _align(v_s, v_t):
  """The student vector with the largest |cosine| to the teacher's, times its sign."""
  cosine = jnp.einsum('bdi,bdj->bij', v_s, v_t)
  top = jnp.max(jnp.abs(cosine), axis=1, keepdims=True)
  mask = jax.lax.stop_gradient(jnp.where(jnp.abs(cosine) == top, jnp.sign(cosine), 0.0))
  return jnp.einsum('bdi,bij->bdj', v_s, mask)


def kdsvd_terms(student_feats, teacher_feats, k, form, teacher_reference=None):
  """The terms of consecutive stage pairs (each already / batch). `teacher_reference`
  ([B, D, k] per stage) flips each teacher vector to a positive dot product with it."""
  terms, prev = [], None
  for i, (f_s, f_t) in enumerate(zip(student_feats, teacher_feats)):
    v_t, s_t = _right_vectors(jax.lax.stop_gradient(f_t), k, form)
    v_t = v_t * _sign_of_largest(v_t)
    if teacher_reference is not None:
      dots = jnp.sum(v_t * teacher_reference[i], axis=1, keepdims=True)
      v_t = v_t * jnp.where(dots < 0, -1.0, 1.0)
    v_s, _ = _right_vectors(f_s, k + 3, form)
    v_s = _align(v_s, v_t)
    v_t, v_s = v_t * s_t[:, None, :], v_s * s_t[:, None, :]
    if prev is not None:
      rbf = lambda a, b: jnp.exp(-jnp.square(a[:, :, None, :] - b[:, None, :, :]) / 8)
      diff = rbf(v_s, prev[0]) - jax.lax.stop_gradient(rbf(v_t, prev[1]))
      terms.append(jnp.sum(_finite(jnp.square(diff))) / f_s.shape[0])
    prev = (v_s, v_t)
  return terms


def _loss(cfg, student, teacher, batch, progress):
  del batch, progress
  terms = kdsvd_terms([student[n] for n in STAGES], [teacher[n] for n in STAGES], cfg.k,
                      cfg.form)
  return {'kdsvd': cfg.weight * sum(terms)}


def _build(cfg, ctx):
  for name in STAGES:
    s, t = ctx.student[name].shape, ctx.teacher[name].shape
    if cfg.form == 'mdistiller' and s[2] != t[2]:
      raise ValueError(f'kdsvd (mdistiller) needs equal {name} widths, got student {s[2]} '
                       f'and teacher {t[2]}')
    if cfg.form == 'repdistiller' and (s[3] != t[3] or s[1] != s[2] or t[1] != t[2]):
      raise ValueError(f'kdsvd (repdistiller) needs equal {name} channels and square maps, '
                       f'got student {s[1:]} and teacher {t[1:]}')
  return methods.PureLoss(_loss, cfg)


KDSVD = methods.register(methods.Method(
    name='kdsvd', doc="KD with singular value decomposition as mdistiller's KDSVD.py.",
    build=_build, ce_weight=lambda cfg: cfg.ce_weight,
    fields={
        'form': methods.Field('mdistiller', "'mdistiller' ([C*H, W] matrices, float32 SVD) or "
                              "'repdistiller' ([H*W, C])", lambda v: v in FORMS,
                              ' or '.join(FORMS)),
        'k': methods.Field(1, 'teacher singular vectors (cfg.py KDSVD.K)',
                           lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0,
                           'an integer > 0'),
        'weight': methods.Field(1.0, 'loss weight (cfg.py KDSVD.LOSS.FEAT_WEIGHT)',
                                methods.non_negative, 'a number >= 0'),
        'ce_weight': methods.Field(1.0, 'cross-entropy weight (cfg.py KDSVD.LOSS.CE_WEIGHT)',
                                   methods.non_negative, 'a number >= 0'),
    }))
