"""Training data kept on the accelerator: uint8 images, augmented inside the step.

CIFAR's 50,000 uint8 training images take 150 MB, which fits on any accelerator.
With the whole split on the device (from `input_pipeline.load_arrays`), a train
step can gather its own batch and augment it inside its XLA program, so the host
never feeds batches. This module needs only jax and numpy (no TensorFlow).

The augmentation has the distribution of the tf.data path (`input_pipeline`):
reflect padding by 4, a uniformly random crop back to the image size, a horizontal
flip with probability 1/2, then `(x / 255 - mean) / std`. Epochs depend only on
(seed, epoch) and each example's augmentation only on (seed, epoch, its position
in the epoch), so neither depends on how batches are split across devices or
steps. The random streams differ from the tf.data path's: the two paths give the
same distributions, not the same batches.

A step of a global batch of `batch_size`, a device's part being `start`,
`start + size`:

  permutation = epoch_permutation(seed, epoch, len(images))  # once per epoch
  indices = batch_indices(permutation, step, batch_size, start, size)
  positions = step * batch_size + start + jnp.arange(size)
  keys = example_keys(seed, epoch, positions)
  batch = augment(images[indices], keys, mean, std), labels[indices]
"""
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax


def normalize(images: jax.Array, mean, std) -> jax.Array:
  """uint8 pixels -> float32 `(x / 255 - mean) / std`, per channel."""
  images = images.astype(jnp.float32) / 255.0
  mean, std = jnp.asarray(mean, jnp.float32), jnp.asarray(std, jnp.float32)
  return (images - mean) / std


def _epoch_keys(seed, epoch) -> jax.Array:
  """Independent (permutation, augmentation) keys of the epoch."""
  return jax.random.split(jax.random.fold_in(jax.random.key(seed), epoch))


def example_keys(seed, epoch, positions: jax.Array) -> jax.Array:
  """A key per example, from (seed, epoch, the example's position in the epoch)."""
  _, augment_key = _epoch_keys(seed, epoch)
  return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(augment_key, positions)


def augment(
    images: jax.Array, keys: jax.Array, mean, std, padding: int = 4,
    padding_mode: str = 'reflect'
) -> jax.Array:
  """Pad ('reflect' as the seed reference, 'zero' as torchvision's RandomCrop(32,
  padding=4) in RepDistiller and mdistiller), random crop, random horizontal flip and
  normalize a batch.

  images: uint8 [B, H, W, C]; keys: [B] (from example_keys). Returns float32
  [B, H, W, C]. Crop offsets are uniform in 0..2*padding on each axis.
  """
  _, height, width, channels = images.shape
  p = padding
  # numpy's 'reflect' (edge not repeated) is tf.pad's 'REFLECT'.
  padded = jnp.pad(images, ((0, 0), (p, p), (p, p), (0, 0)),
                   mode={'reflect': 'reflect', 'zero': 'constant'}[padding_mode])

  def crop_and_flip(image, key):
    crop_key, flip_key = jax.random.split(key)
    dy, dx = jax.random.randint(crop_key, (2,), 0, 2 * p + 1)
    crop = lax.dynamic_slice(image, (dy, dx, 0), (height, width, channels))
    return jnp.where(jax.random.bernoulli(flip_key), crop[:, ::-1], crop)

  # Crop and flip the uint8 pixels: a quarter of the bytes of float32.
  return normalize(jax.vmap(crop_and_flip)(padded, keys), mean, std)


def epoch_permutation(seed, epoch, num_examples: int) -> jax.Array:
  """int32 [num_examples]: the order of the examples in the epoch."""
  permutation_key, _ = _epoch_keys(seed, epoch)
  return jax.random.permutation(permutation_key, num_examples).astype(jnp.int32)


def batch_indices(
    permutation: jax.Array,
    step,
    batch_size: int,
    start: int = 0,
    size: Optional[int] = None,
) -> jax.Array:
  """The examples `start:start + size` of step `step`'s global batch.

  That is permutation[step * batch_size + start:][:size]; size defaults to the
  rest of the batch. `step` may be traced; the rest are static. Like every
  dynamic_slice, a step past the epoch's last full batch is clamped, not refused:
  keep step < len(permutation) // batch_size.
  """
  if size is None:
    size = batch_size - start
  if not (0 <= start and 0 < size and start + size <= batch_size
          and batch_size <= permutation.shape[0]):
    raise ValueError(
        f'start {start} and size {size} must select a non-empty part of a batch '
        f'of {batch_size}, and the batch fit in {permutation.shape[0]} examples'
    )
  return lax.dynamic_slice(permutation, (step * batch_size + start,), (size,))
