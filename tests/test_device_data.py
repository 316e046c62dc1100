"""Tests of kd_jax.device_data (the on-device input path) against the tf.data path,
and of input_pipeline.load_arrays, which feeds it. The tests that need TensorFlow
are skipped where it is not installed."""
import contextlib
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from kd_jax import device_data
from tests.conftest import TFDS_DATA_DIR, write_tiny_cifar10

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)  # CIFAR-10's
PADDING = 4
NUM_OFFSETS = 2 * PADDING + 1  # crop offsets per axis
NUM_WINDOWS = NUM_OFFSETS * NUM_OFFSETS * 2  # and flipped or not
# Padded index -> image index of the reflect padding (the edge is not repeated).
REFLECTED = np.pad(np.arange(32), PADDING, mode='reflect')
# The image rows of each crop offset dy, and the columns of each (dx, flipped).
WINDOW_ROWS = np.stack([REFLECTED[d:d + 32] for d in range(NUM_OFFSETS)])
WINDOW_COLS = np.stack([WINDOW_ROWS, WINDOW_ROWS[:, ::-1]], axis=1)


@pytest.fixture
def input_pipeline():
  pytest.importorskip('tensorflow')
  pytest.importorskip('tensorflow_datasets')
  from kd_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  return input_pipeline


def random_images(n, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def pattern_image():
  """Channel 0 holds each pixel's row, channel 1 its column."""
  rows, cols = np.meshgrid(np.arange(32), np.arange(32), indexing='ij')
  return np.stack([rows, cols, np.full_like(rows, 200)], axis=-1).astype(np.uint8)


def windows(crops):
  """(dy, dx, flipped) arrays of crops of pattern_image(); each crop must be
  exactly that window of the reflect-padded image, and match no other."""
  rows_match = (crops[:, None, :, 0, 0] == WINDOW_ROWS[None]).all(-1)
  cols_match = (crops[:, None, None, 0, :, 1] == WINDOW_COLS[None]).all(-1)
  assert (rows_match.sum(1) == 1).all() and (cols_match.sum((1, 2)) == 1).all(), (
      'a crop is not exactly one window of the reflect-padded image')
  dy = rows_match.argmax(1)
  dx, flipped = np.unravel_index(cols_match.reshape(len(crops), -1).argmax(1),
                                 WINDOW_COLS.shape[:2])
  rows, cols = WINDOW_ROWS[dy], WINDOW_COLS[dx, flipped]
  np.testing.assert_array_equal(crops, pattern_image()[rows[:, :, None], cols[:, None, :]])
  return dy, dx, flipped


def window_ids(dy, dx, flipped):
  return (dy * NUM_OFFSETS + dx) * 2 + flipped


def assert_uniform(values, num_values):
  """A chi-square test (the draws are seeded: the outcome is fixed)."""
  counts = np.bincount(values, minlength=num_values)
  assert counts.min() > 0  # every value occurs
  assert stats.chisquare(counts).pvalue > 1e-3, counts


def assert_uniform_windows(dy, dx, flipped):
  assert_uniform(dy, NUM_OFFSETS)
  assert_uniform(dx, NUM_OFFSETS)
  assert_uniform(flipped.astype(int), 2)
  assert_uniform(window_ids(dy, dx, flipped), NUM_WINDOWS)


def test_imports_without_tensorflow():
  code = ('import sys; sys.modules.update(tensorflow=None, tensorflow_datasets=None); '
          'import kd_jax.device_data')
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  subprocess.run([sys.executable, '-c', code], check=True, cwd=root)


@pytest.mark.parametrize('dataset', ('cifar10', 'cifar100'))
def test_normalize_matches_tf_path(input_pipeline, dataset):
  info = input_pipeline.get_dataset_info(dataset)
  # Every pixel value in every channel.
  images = np.stack([np.arange(256, dtype=np.uint8).reshape(8, 32, 1)] * 3, axis=-1)
  expected = input_pipeline._normalize(images, info).numpy()  # pylint: disable=protected-access
  actual = jax.jit(device_data.normalize)(images, info.mean, info.std)
  assert actual.dtype == jnp.float32
  np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-6)


def test_augmentation_distribution_matches_tf_path(input_pipeline):
  """Both paths crop the same reflect-padded windows, uniformly over the 9 x 9
  offsets and 2 flips, and give the same pixels for the same window."""
  tf = input_pipeline.tf
  n = 30 * NUM_WINDOWS
  pattern, image = pattern_image(), random_images(1)[0]
  info = input_pipeline.get_dataset_info('cifar10')

  # jax: augment both images with the same keys; mean 0 and std 1 give x / 255.
  keys = device_data.example_keys(0, 0, jnp.arange(n))
  augment = jax.jit(device_data.augment)
  crops = augment(np.broadcast_to(pattern, (n, 32, 32, 3)), keys, 0.0, 1.0)
  jax_windows = windows(np.round(np.asarray(crops) * 255).astype(np.uint8))
  jax_crops = np.asarray(
      augment(np.broadcast_to(image, (n, 32, 32, 3)), keys, info.mean, info.std))

  # tf.data: the TrainData path's augmentation with stateless keys.
  def tf_augment(index):
    key = tf.random.experimental.stateless_fold_in(tf.constant([1, 2], tf.int64), index)
    crops = [input_pipeline._augment(x, key) for x in (pattern, image)]  # pylint: disable=protected-access
    return crops[0], input_pipeline._normalize(crops[1], info)  # pylint: disable=protected-access

  ds = tf.data.Dataset.range(n).map(tf_augment, num_parallel_calls=tf.data.AUTOTUNE)
  tf_pattern_crops, tf_crops = (x.numpy() for x in ds.batch(n).get_single_element())
  tf_windows = windows(tf_pattern_crops)

  assert_uniform_windows(*jax_windows)
  assert_uniform_windows(*tf_windows)
  # The same window of the random image: the same normalised pixels.
  jax_ids, tf_ids = window_ids(*jax_windows), window_ids(*tf_windows)
  for window in range(NUM_WINDOWS):
    np.testing.assert_allclose(
        jax_crops[np.argmax(jax_ids == window)], tf_crops[np.argmax(tf_ids == window)],
        rtol=0, atol=1e-6)


def test_augmentation_depends_only_on_seed_epoch_and_position():
  images = jnp.asarray(random_images(24))

  @jax.jit
  def run(images, seed, epoch, positions):
    keys = device_data.example_keys(seed, epoch, positions)
    return device_data.augment(images[positions], keys, MEAN, STD)

  seed, epoch_number, positions = jnp.int32(0), jnp.int32(0), jnp.arange(24)
  epoch = np.asarray(run(images, seed, epoch_number, positions))
  # Other batch compositions: a device's part, a shuffled subset.
  for part in (np.arange(8, 16), np.random.default_rng(0).permutation(24)[:8]):
    np.testing.assert_array_equal(
        run(images, seed, epoch_number, jnp.asarray(part)), epoch[part])
  for other in ((seed + 1, epoch_number), (seed, epoch_number + 1)):
    assert not np.array_equal(run(images, *other, positions), epoch)
  # Python ints are the same seed and epoch; every position has its own key.
  keys = jax.random.key_data(device_data.example_keys(0, 0, positions))
  np.testing.assert_array_equal(
      keys, jax.random.key_data(device_data.example_keys(seed, epoch_number, positions)))
  assert len(set(map(bytes, np.asarray(keys)))) == 24
  # One image at different positions: mostly different crops (of 162 windows).
  crops = np.asarray(run(jnp.broadcast_to(images[0], images.shape), seed, epoch_number, positions))
  assert len(set(map(bytes, crops))) > 15


def test_epoch_permutation():
  permutation = device_data.epoch_permutation(3, 2, 1000)
  assert permutation.dtype == jnp.int32 and permutation.shape == (1000,)
  np.testing.assert_array_equal(np.sort(permutation), np.arange(1000))
  assert not np.array_equal(permutation, np.arange(1000))
  np.testing.assert_array_equal(jax.jit(device_data.epoch_permutation, static_argnums=2)(
      jnp.int32(3), jnp.int32(2), 1000), permutation)
  for seed, epoch in ((3, 3), (4, 2)):
    assert not np.array_equal(device_data.epoch_permutation(seed, epoch, 1000), permutation)


def test_batch_indices():
  permutation = device_data.epoch_permutation(0, 0, 100)
  indices = jax.jit(device_data.batch_indices, static_argnums=(2, 3, 4))
  for step in range(3):  # 100 // 32 full batches
    batch = np.asarray(permutation[step * 32:(step + 1) * 32])
    np.testing.assert_array_equal(indices(permutation, step, 32, 0, None), batch)
    parts = [indices(permutation, step, 32, start, 8) for start in range(0, 32, 8)]
    np.testing.assert_array_equal(np.concatenate(parts), batch)
    np.testing.assert_array_equal(indices(permutation, step, 32, 8, None), batch[8:])
  for start, size, batch_size in ((-1, 8, 32), (0, 0, 32), (24, 16, 32), (0, None, 128)):
    with pytest.raises(ValueError, match='start'):
      device_data.batch_indices(permutation, 0, batch_size, start, size)


def read_raw(tfds, dataset, split, data_dir=None):
  """The split's uint8 images and labels, read one by one through TFDS."""
  ds = tfds.builder(dataset, data_dir=data_dir).as_dataset(split=split, shuffle_files=False)
  examples = list(tfds.as_numpy(ds))
  return (np.stack([ex['image'] for ex in examples]),
          np.array([ex['label'] for ex in examples]))


@pytest.mark.parametrize('dataset', ('cifar10', 'cifar100'))
def test_load_arrays_mock(input_pipeline, dataset):
  tfds = input_pipeline.tfds
  with tfds.testing.mock_data(num_examples=40):
    images, labels = input_pipeline.load_arrays(dataset, 'train', None)
    raw_images, raw_labels = read_raw(tfds, dataset, 'train')
  assert images.dtype == np.uint8 and images.shape == (40, 32, 32, 3)
  assert labels.dtype == np.int32 and labels.shape == (40,)
  num_classes = input_pipeline.get_dataset_info(dataset).num_classes
  assert labels.min() >= 0 and labels.max() < num_classes
  np.testing.assert_array_equal(images, raw_images)
  np.testing.assert_array_equal(labels, raw_labels)


def test_load_arrays_whole_split_in_every_process(input_pipeline, tmp_path, monkeypatch):
  data_dir = write_tiny_cifar10(tmp_path, {'train': 21})
  raw_images, raw_labels = read_raw(input_pipeline.tfds, 'cifar10', 'train', data_dir)
  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  for index in (0, 1):
    monkeypatch.setattr(jax, 'process_index', lambda index=index: index)
    images, labels = input_pipeline.load_arrays('cifar10', 'train', data_dir)
    np.testing.assert_array_equal(images, raw_images)
    np.testing.assert_array_equal(labels, raw_labels)
  # _open_split's errors.
  for args, text in ((('cifar10', 'train', str(tmp_path / 'missing')), 'missing'),
                     (('cifar10', 'train[:abc]', data_dir), 'train[:abc]'),
                     (('cifar100', 'train', data_dir), 'cifar100'),
                     (('imagenet', 'train', data_dir), 'imagenet')):
    with pytest.raises(ValueError, match=text.replace('[', r'\[')):
      input_pipeline.load_arrays(*args)


def test_load_arrays_matches_eval_data(input_pipeline):
  """Real CIFAR-10 from KD_TFDS_DATA_DIR, or mock data without it."""
  tfds = input_pipeline.tfds
  info = input_pipeline.get_dataset_info('cifar10')
  source = (tfds.testing.mock_data(num_examples=100) if TFDS_DATA_DIR is None
            else contextlib.nullcontext())
  with source:
    images, labels = input_pipeline.load_arrays('cifar10', 'test[:100]', TFDS_DATA_DIR)
    batch, = list(input_pipeline.EvalData('cifar10', 'test[:100]', 100, TFDS_DATA_DIR))
  assert images.shape == (100, 32, 32, 3)
  np.testing.assert_allclose(
      device_data.normalize(images, info.mean, info.std), batch['image'], rtol=0, atol=1e-6)
  np.testing.assert_array_equal(labels, batch['label'])
