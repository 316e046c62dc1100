"""A symmetric eigendecomposition in plain XLA operations (no LAPACK or cuSOLVER call).

kdsvd needs the leading singular vectors of small per-sample matrices inside the train
step. jnp.linalg.svd / eigh lower to LAPACK custom calls on CPU; inside kd_jax's jitted
train step (jaxlib 0.10 with the convolution flag of cpu_flags.py) the differentiated SVD
hung XLA:CPU, and the suite's jitted SVD hung once under two pytest workers. This solver
is cyclic Jacobi with the round-robin (parallel) ordering: every round rotates n/2
disjoint index pairs at once, n - 1 rounds make a sweep, sweeps repeat until the
off-diagonal part is at rounding level. Its gradient is the analytic one (the same rule as
jnp.linalg.eigh's), never a derivative of the iterations.
"""

import jax
import jax.numpy as jnp
import numpy as np

MAX_SWEEPS = 30


def _round_robin(n: int) -> np.ndarray:
  """The slot permutation between rounds: slots (2i, 2i+1) are paired; slot 0 stays, the
  others move one place along the circle 2, 4, ..., n-2, n-1, n-3, ..., 1, so that n - 1
  rounds pair every two indices once."""
  circle = list(range(2, n, 2)) + list(range(n - 1, 0, -2))
  src = np.arange(n)
  for pos, prev in zip(circle, circle[-1:] + circle[:-1]):
    src[pos] = prev  # the slot at `pos` receives what was at the previous place
  return src


def _rotate(g, v):
  """One round: the Jacobi rotations of pairs (2i, 2i+1) applied to g (both sides) and to
  v's columns. g [B, n, n], v [B, n, n], n even."""
  b, n, _ = g.shape
  m = n // 2
  blocks = g.reshape(b, m, 2, m, 2)
  diag = jnp.diagonal(blocks, axis1=1, axis2=3)  # [B, 2, 2, m]
  app, aqq, apq = diag[:, 0, 0], diag[:, 1, 1], diag[:, 0, 1]
  # Golub & Van Loan's sym.schur2: [[c, s], [-s, c]] diagonalises [[app, apq], [apq, aqq]].
  nonzero = apq != 0
  tau = (aqq - app) / (2 * jnp.where(nonzero, apq, 1))
  t = jnp.where(tau >= 0, 1.0, -1.0) / (jnp.abs(tau) + jnp.sqrt(1 + tau * tau))
  t = jnp.where(nonzero, t, 0).astype(g.dtype)
  c = jax.lax.rsqrt(1 + t * t)
  s = t * c
  rot = jnp.stack([jnp.stack([c, s], -1), jnp.stack([-s, c], -1)], -2)  # [B, m, 2, 2]
  blocks = jnp.einsum('bixa,bixjy->biajy', rot, blocks)
  blocks = jnp.einsum('biajy,bjyd->biajd', blocks, rot)
  v = jnp.einsum('bkjy,bjyd->bkjd', v.reshape(b, n, m, 2), rot)
  return blocks.reshape(b, n, n), v.reshape(b, n, n)


def _off(g):
  """Squared Frobenius norm of the off-diagonal part (summed directly: the difference of
  the full and the diagonal norms would cancel catastrophically)."""
  n = g.shape[-1]
  return jnp.sum(jnp.square(jnp.where(jnp.eye(n, dtype=bool), 0, g)), axis=(-2, -1))


def _jacobi(g):
  """(eigenvalues, eigenvectors as columns) of symmetric [B, n, n], unsorted."""
  b, n, _ = g.shape
  if n % 2:  # a padded index has no off-diagonal entries, so it is never rotated
    g = jnp.pad(g, ((0, 0), (0, 1), (0, 1)))
  size = g.shape[-1]
  src = _round_robin(size)
  eps = jnp.finfo(g.dtype).eps
  # Off-diagonal norm at n x rounding level of the whole (float32 stalls just below it).
  tol = jnp.square(eps * size) * jnp.sum(jnp.square(g), axis=(-2, -1))

  def sweep(carry):
    g, v, k = carry

    def one_round(_, gv):
      g, v = _rotate(*gv)
      return g[:, src][:, :, src], v[:, :, src]

    g, v = jax.lax.fori_loop(0, size - 1, one_round, (g, v))
    return g, v, k + 1

  def unconverged(carry):
    g, _, k = carry
    return jnp.logical_and(k < MAX_SWEEPS, jnp.any(_off(g) > tol))

  v = jnp.broadcast_to(jnp.eye(size, dtype=g.dtype), g.shape)
  g, v, _ = jax.lax.while_loop(unconverged, sweep, (g, v, 0))
  w = jnp.diagonal(g, 0, -2, -1)
  if n % 2:  # the padded slot holds the padded index's unit vector: drop that column
    keep = jnp.argsort(jnp.abs(v[:, n, :]), axis=-1)[:, :n]
    w = jnp.take_along_axis(w, keep, -1)
    v = jnp.take_along_axis(v[:, :n, :], keep[:, None, :], -1)
  return w, v


@jax.custom_jvp
def eigh(g):
  """(w [..., n] descending, v [..., n, n]) with g = v diag(w) v^T for symmetric g."""
  shape = g.shape
  w, v = _jacobi(jax.lax.stop_gradient(g).reshape((-1,) + shape[-2:]))
  order = jnp.argsort(-w, axis=-1)
  w = jnp.take_along_axis(w, order, -1)
  v = jnp.take_along_axis(v, order[:, None, :], -1)
  return w.reshape(shape[:-1]), v.reshape(shape)


@eigh.defjvp
def _eigh_jvp(primals, tangents):
  (g,), (dg,) = primals, tangents
  w, v = eigh(g)
  dg = (dg + jnp.swapaxes(dg, -1, -2)) / 2
  x = jnp.swapaxes(v, -1, -2) @ dg @ v
  gap = w[..., None, :] - w[..., :, None]  # w_j - w_i
  eye = jnp.eye(w.shape[-1], dtype=bool)
  f = jnp.where(eye, 0, 1 / jnp.where(eye, 1, gap))
  return (w, v), (jnp.diagonal(x, 0, -2, -1), v @ (f * x))
