"""Tests of kd_jax.input_pipeline on mock TFDS data, a tiny prepared CIFAR-10 and,
when KD_TFDS_DATA_DIR names a TFDS data_dir holding it, the real CIFAR-10."""
import contextlib
import os

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from kd_jax import input_pipeline
from tests.conftest import write_tiny_cifar10

DATASETS = ('cifar10', 'cifar100')
NUM_MOCK = 64
BATCH = 16  # NUM_MOCK // BATCH = 4 steps per epoch


@pytest.fixture
def mock_tfds():
  # No metadata files: the random policy, any split name gives NUM_MOCK examples.
  with tfds.testing.mock_data(num_examples=NUM_MOCK):
    yield


@pytest.fixture(scope='module')
def tiny_cifar10(tmp_path_factory):
  """A real prepared TFDS data_dir with a 41-example train and 31-example test
  CIFAR-10 split, so that TFDS itself resolves (and rejects) split names."""
  return write_tiny_cifar10(tmp_path_factory.mktemp('tfds'), {'train': 41, 'test': 31})


def read_raw(dataset, split, data_dir=None):
  """The split's uint8 images and labels in TFDS's order."""
  builder = tfds.builder(dataset, data_dir=data_dir)
  ds = builder.as_dataset(split=split, shuffle_files=False)
  examples = list(tfds.as_numpy(ds))
  return (np.stack([ex['image'] for ex in examples]),
          np.array([ex['label'] for ex in examples]))


def normalize(images, dataset):
  info = input_pipeline.get_dataset_info(dataset)
  mean, std = np.float32(info.mean), np.float32(info.std)
  return (images.astype(np.float32) / np.float32(255.0) - mean) / std


def to_uint8(images, dataset):
  """Undoes the normalisation; the result must be whole pixel values."""
  info = input_pipeline.get_dataset_info(dataset)
  pixels = (images * np.float32(info.std) + np.float32(info.mean)) * 255.0
  np.testing.assert_allclose(pixels, np.round(pixels), atol=1e-3)
  assert pixels.min() > -0.5 and pixels.max() < 255.5
  return np.round(pixels).astype(np.uint8)


def stack(batches):
  return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def crop_windows(image, augmented):
  """The (dy, dx, flipped) windows of the reflect-padded image equal to augmented."""
  padded = np.pad(image, ((4, 4), (4, 4), (0, 0)), mode='reflect')
  return [(dy, dx, flipped)
          for dy in range(9) for dx in range(9) for flipped in (False, True)
          if np.array_equal(
              padded[dy:dy + 32, dx:dx + 32][:, ::-1] if flipped
              else padded[dy:dy + 32, dx:dx + 32], augmented)]


@pytest.mark.parametrize('dataset', DATASETS)
def test_mock_data_is_cifar_like(mock_tfds, dataset):
  images, labels = read_raw(dataset, 'train')
  assert images.dtype == np.uint8 and images.shape == (NUM_MOCK, 32, 32, 3)
  num_classes = input_pipeline.get_dataset_info(dataset).num_classes
  assert labels.min() >= 0 and labels.max() < num_classes


@pytest.mark.parametrize('dataset', DATASETS)
def test_train_batches(mock_tfds, dataset):
  data = input_pipeline.TrainData(dataset, 'train', BATCH, seed=0, data_dir=None)
  assert data.num_examples == NUM_MOCK
  assert data.steps_per_epoch == NUM_MOCK // BATCH
  batches = list(data.epoch(0))
  assert len(batches) == data.steps_per_epoch
  indices = np.concatenate([b['index'] for b in batches])
  # Each example's position in the split, once per epoch (CRD's memory rows).
  assert len(set(indices.tolist())) == len(indices) and indices.max() < NUM_MOCK
  for batch in batches:
    assert set(batch) == {'image', 'label', 'index'}
    assert batch['image'].dtype == np.float32
    assert batch['image'].shape == (BATCH, 32, 32, 3)
    assert batch['label'].dtype == np.int32 and batch['label'].shape == (BATCH,)


def test_last_partial_train_batch_is_dropped():
  with tfds.testing.mock_data(num_examples=50):
    data = input_pipeline.TrainData('cifar10', 'train', BATCH, 0, None)
    assert data.steps_per_epoch == 3
    assert len(list(data.epoch(0))) == 3


@pytest.mark.parametrize('dataset', DATASETS)
def test_unaugmented_epoch_is_normalised_permutation(mock_tfds, dataset):
  images, labels = read_raw(dataset, 'train')
  data = input_pipeline.TrainData(
      dataset, 'train', BATCH, seed=0, data_dir=None, augment=False)
  epoch = stack(list(data.epoch(0)))
  to_uint8(epoch['image'], dataset)
  expected = normalize(images, dataset)
  order = [int(np.argmin(np.abs(expected - image).max(axis=(1, 2, 3))))
           for image in epoch['image']]
  assert sorted(order) == list(range(NUM_MOCK))  # each example exactly once
  assert order != sorted(order)  # and shuffled
  np.testing.assert_allclose(epoch['image'], expected[order], atol=1e-6)
  np.testing.assert_array_equal(epoch['label'], labels[order])


def test_augmentation_is_a_reflect_padded_crop(mock_tfds):
  plain = input_pipeline.TrainData('cifar10', 'train', BATCH, 3, None, augment=False)
  augmented = input_pipeline.TrainData('cifar10', 'train', BATCH, 3, None)
  plain, augmented = stack(list(plain.epoch(1))), stack(list(augmented.epoch(1)))
  # Same order and labels, different images.
  np.testing.assert_array_equal(plain['label'], augmented['label'])
  assert not np.allclose(plain['image'], augmented['image'])
  originals = to_uint8(plain['image'], 'cifar10')
  crops = to_uint8(augmented['image'], 'cifar10')
  windows = [crop_windows(o, c) for o, c in zip(originals, crops)]
  assert all(windows), 'an augmented image is no window of its padded original'
  # Flips and offsets both vary (random images match exactly one window).
  assert {w[0][2] for w in windows} == {False, True}
  assert len({w[0][:2] for w in windows}) > 10


def test_epochs_are_deterministic_and_resumable(mock_tfds):
  def epoch(seed, e, start_step=0):
    data = input_pipeline.TrainData('cifar100', 'train', BATCH, seed, None)
    return list(data.epoch(e, start_step))

  first = epoch(7, 2)
  for a, b in zip(first, epoch(7, 2)):
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['label'], b['label'])
  for other in (epoch(7, 3), epoch(8, 2)):
    assert not np.array_equal(stack(first)['label'], stack(other)['label'])
  for start_step in (1, 3, 4):
    tail = epoch(7, 2, start_step)
    assert len(tail) == len(first) - start_step
    for a, b in zip(first[start_step:], tail):
      np.testing.assert_array_equal(a['image'], b['image'])
      np.testing.assert_array_equal(a['label'], b['label'])


@pytest.mark.parametrize('dataset', DATASETS)
def test_eval_covers_every_example_once(dataset):
  with tfds.testing.mock_data(num_examples=50):
    images, labels = read_raw(dataset, 'test')
    data = input_pipeline.EvalData(dataset, 'test', BATCH, data_dir=None)
    assert data.num_examples == 50 and data.num_batches == 4
    batches = list(data)
    assert len(batches) == 4
    for batch in batches:
      assert batch['image'].dtype == np.float32
      assert batch['image'].shape == (BATCH, 32, 32, 3)
      assert batch['label'].dtype == np.int32 and batch['label'].shape == (BATCH,)
      assert batch['mask'].dtype == np.bool_ and batch['mask'].shape == (BATCH,)
    epoch = stack(batches)
  np.testing.assert_array_equal(epoch['mask'], np.arange(64) < 50)
  np.testing.assert_allclose(
      epoch['image'][:50], normalize(images, dataset), atol=1e-6)
  np.testing.assert_array_equal(epoch['label'][:50], labels)
  assert not epoch['image'][50:].any() and not epoch['label'][50:].any()


def test_processes_share_the_split(tiny_cifar10, monkeypatch):
  """Two processes: each reads its half, and the step counts agree."""
  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  train_steps, eval_labels = [], []
  for index in (0, 1):
    monkeypatch.setattr(jax, 'process_index', lambda index=index: index)
    train = input_pipeline.TrainData('cifar10', 'train', 8, 0, tiny_cifar10)
    assert train.num_examples == 41 and train.steps_per_epoch == 41 // 8
    batches = list(train.epoch(0))
    assert all(b['label'].shape == (4,) for b in batches)
    train_steps.append(len(batches))
    data = input_pipeline.EvalData('cifar10', 'test', 8, tiny_cifar10)
    batches = list(data)
    assert len(batches) == data.num_batches == 4  # ceil(31 / 8)
    epoch = stack(batches)
    eval_labels.append(epoch['label'][epoch['mask']])
  assert train_steps == [5, 5]
  _, labels = read_raw('cifar10', 'test', tiny_cifar10)
  np.testing.assert_array_equal(np.concatenate(eval_labels), labels)


def test_bad_inputs(mock_tfds, monkeypatch):
  def error(build, *args, **kwargs):
    with pytest.raises(ValueError) as info:
      build(*args, **kwargs)
    message = str(info.value)
    assert '\n' not in message
    return message

  train, eval_ = input_pipeline.TrainData, input_pipeline.EvalData
  message = error(input_pipeline.get_dataset_info, 'imagenet')
  assert message == (
      "unknown dataset 'imagenet'; expected one of: cifar10, cifar100")
  assert 'imagenet' in error(train, 'imagenet', 'train', BATCH, 0, None)
  assert 'imagenet' in error(eval_, 'imagenet', 'test', BATCH, None)
  for batch_size in (0, -16):
    assert str(batch_size) in error(train, 'cifar10', 'train', batch_size, 0, None)
    assert str(batch_size) in error(eval_, 'cifar10', 'test', batch_size, None)
  assert '128' in error(train, 'cifar10', 'train', 128, 0, None)  # > NUM_MOCK
  data = train('cifar10', 'train', BATCH, 0, None)
  assert 'start_step 5' in error(data.epoch, 0, start_step=5)
  monkeypatch.setattr(jax, 'process_count', lambda: 3)
  assert '16' in error(train, 'cifar10', 'train', BATCH, 0, None)
  assert '16' in error(eval_, 'cifar10', 'test', BATCH, None)


def test_bad_data_dir_and_split(tiny_cifar10, tmp_path):
  def error(*args):
    with pytest.raises(ValueError) as info:
      input_pipeline.TrainData(*args)
    message = str(info.value)
    assert '\n' not in message
    return message

  missing = str(tmp_path / 'missing')
  assert missing in error('cifar10', 'train', BATCH, 0, missing)
  for dataset, data_dir in (('cifar10', str(tmp_path)), ('cifar100', tiny_cifar10)):
    message = error(dataset, 'train', BATCH, 0, data_dir)
    assert dataset in message and data_dir in message
  for split in ('validation', 'train[:abc]', 'train[100:]'):
    assert split in error('cifar10', split, BATCH, 0, tiny_cifar10)
  with pytest.raises(ValueError, match='validation'):
    input_pipeline.EvalData('cifar10', 'validation', BATCH, tiny_cifar10)
  assert '64' in error('cifar10', 'train', 64, 0, tiny_cifar10)  # 41 examples


def test_cifar10():
  """Real CIFAR-10 from KD_TFDS_DATA_DIR, or the same checks on mock data."""
  data_dir = os.environ.get('KD_TFDS_DATA_DIR')

  def source(num_examples):
    if data_dir:
      return contextlib.nullcontext()
    # Mock data ignores the split's slice: give it the slice's size.
    return tfds.testing.mock_data(num_examples=num_examples)

  with source(512):
    train = input_pipeline.TrainData('cifar10', 'train[:512]', 128, 0, data_dir)
    train_batches = list(train.epoch(0))
  with source(300):
    test = input_pipeline.EvalData('cifar10', 'test[:300]', 128, data_dir)
    test_batches = list(test)
  assert train.num_examples == 512 and train.steps_per_epoch == 4
  assert test.num_examples == 300 and test.num_batches == 3
  assert [b['image'].shape for b in train_batches] == [(128, 32, 32, 3)] * 4
  assert [b['image'].shape for b in test_batches] == [(128, 32, 32, 3)] * 3
  train, test = stack(train_batches), stack(test_batches)
  assert test['mask'].sum() == 300
  for split in (train, test):
    assert split['label'].min() >= 0 and split['label'].max() <= 9
  if data_dir:  # random mock pixels do not have CIFAR's statistics
    for images in (train['image'], test['image'][test['mask']]):
      np.testing.assert_allclose(images.mean(axis=(0, 1, 2)), 0.0, atol=0.3)
