"""Small pieces several methods share."""
import jax.numpy as jnp
import optax


def wide(x):
  """Losses run in at least float32 even when the models compute in bfloat16."""
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def cross_entropy(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(wide(logits), labels).mean()


def mse(a, b):
  return jnp.mean(jnp.square(wide(a) - wide(b)))
