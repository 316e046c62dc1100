"""linalg.eigh (Jacobi in plain XLA operations) against numpy's LAPACK, values and gradient."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from kd_jax import linalg


def _symmetric(rng, batch, n, rank=None):
  a = rng.standard_normal((batch, n, rank or n))
  return a @ np.swapaxes(a, -1, -2)


@pytest.mark.parametrize('n', [1, 2, 5, 8, 33])
def test_eigh_matches_lapack(n):
  rng = np.random.default_rng(n)
  g = _symmetric(rng, 3, n)
  with jax.enable_x64(True):
    w, v = jax.jit(linalg.eigh)(jnp.asarray(g))
    w, v = np.asarray(w), np.asarray(v)
  want = np.linalg.eigvalsh(g)[:, ::-1]
  np.testing.assert_allclose(w, want, rtol=1e-10, atol=1e-10 * np.abs(want).max())
  assert np.all(np.diff(w, axis=-1) <= 0), 'eigenvalues not descending'
  np.testing.assert_allclose(np.swapaxes(v, -1, -2) @ v, np.broadcast_to(np.eye(n), g.shape),
                             atol=1e-12)
  np.testing.assert_allclose(v * w[:, None, :] @ np.swapaxes(v, -1, -2), g,
                             atol=1e-10 * np.abs(g).max())


def test_eigh_float32_and_rank_deficient_and_zero():
  rng = np.random.default_rng(0)
  g = np.concatenate([_symmetric(rng, 2, 16, rank=3), np.zeros((1, 16, 16))]).astype(np.float32)
  w, v = jax.jit(linalg.eigh)(jnp.asarray(g))
  w, v = np.asarray(w), np.asarray(v)
  want = np.linalg.eigvalsh(g.astype(np.float64))[:, ::-1]
  np.testing.assert_allclose(w, want, atol=1e-5 * np.abs(want).max())
  np.testing.assert_allclose(np.swapaxes(v, -1, -2) @ v, np.broadcast_to(np.eye(16), g.shape),
                             atol=1e-5)
  # A kdsvd-like Gram (non-negative features: one dominant eigenvalue) is reconstructed at
  # float32 rounding level (a convergence test that cancels would stop early).
  m = np.abs(rng.standard_normal((4, 2048, 32))).astype(np.float32)
  gram = np.einsum('bij,bik->bjk', m, m)
  w2, v2 = (np.asarray(a) for a in jax.jit(linalg.eigh)(jnp.asarray(gram)))
  np.testing.assert_allclose(v2 * w2[:, None, :] @ np.swapaxes(v2, -1, -2), gram,
                             atol=2e-5 * np.abs(gram).max())
  # The leading 3 eigenvectors of the rank-3 matrices are LAPACK's up to sign.
  _, want_v = np.linalg.eigh(g[:2].astype(np.float64))
  dots = np.abs(np.einsum('bij,bij->bj', v[:2, :, :3], want_v[:, :, ::-1][:, :, :3]))
  np.testing.assert_allclose(dots, 1, atol=1e-5)


def test_convergence_measure_does_not_cancel():
  """The off-diagonal norm of a nearly diagonal float32 matrix with a large diagonal (what
  Jacobi's stopping test sees) is its own, not the rounding of two large norms' difference."""
  off = np.full((1, 32, 32), 1e-3, np.float32)
  g = off + np.diag(np.arange(1, 33, dtype=np.float32) * 1e4)[None]
  np.testing.assert_allclose(float(linalg._off(jnp.asarray(g))[0]), 32 * 31 * 1e-6, rtol=1e-4)


def test_eigh_gradient_is_the_analytic_one():
  """A sign-invariant function of the leading eigenvectors and the values, checked against
  finite differences in float64 (a random matrix has distinct eigenvalues)."""
  rng = np.random.default_rng(1)
  a = rng.standard_normal((2, 7, 7))
  probe = rng.standard_normal((7, 3))

  def f(a):
    w, v = linalg.eigh(a @ jnp.swapaxes(a, -1, -2))
    return jnp.sum(jnp.square(jnp.einsum('bij,ik->bjk', v[:, :, :3], probe))) + jnp.sum(w[:, :2])

  with jax.enable_x64(True):
    check_grads(f, (jnp.asarray(a),), order=1, modes=('rev', 'fwd'), atol=1e-6, rtol=1e-6)
