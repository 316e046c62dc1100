"""CIFAR input pipelines: deterministic, resumable tf.data feeding numpy batches.

Each process reads only its own part of a TFDS split and yields batches of
`global_batch_size // jax.process_count()` examples. Training epochs depend only on
(seed, epoch): the split is shuffled with a seed derived from them and every
example is augmented with stateless random ops keyed by its position in the epoch,
so `TrainData.epoch(e, start_step=k)` resumes epoch e exactly at step k.
"""
import dataclasses
import math
import os
from typing import Iterator, Optional

import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

# The accelerators belong to JAX: keep TensorFlow (tf.data) on the CPU.
tf.config.set_visible_devices([], 'GPU')

# Reflect padding around the image before the random crop, as the reference's
# transforms.Pad(4, padding_mode='reflect').
CROP_PADDING = 4


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  name: str
  num_classes: int
  mean: tuple[float, float, float]  # per channel (RGB) of [0, 1] pixels
  std: tuple[float, float, float]
  image_shape: tuple[int, int, int] = (32, 32, 3)


DATASETS = {
    'cifar10': DatasetInfo(
        'cifar10', 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
    ),
    'cifar100': DatasetInfo(
        'cifar100', 100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
    ),
}


def get_dataset_info(name: str) -> DatasetInfo:
  if name not in DATASETS:
    raise ValueError(
        f"unknown dataset {name!r}; expected one of: {', '.join(DATASETS)}"
    )
  return DATASETS[name]


def _check_batch_size(global_batch_size: int) -> int:
  """Returns the per-process batch size."""
  num_processes = jax.process_count()
  if global_batch_size <= 0 or global_batch_size % num_processes:
    raise ValueError(
        f'global_batch_size {global_batch_size} must be positive and divisible '
        f'by the number of processes ({num_processes})'
    )
  return global_batch_size // num_processes


def _open_split(
    info: DatasetInfo, split: str, data_dir: Optional[str]
) -> tuple[int, tf.data.Dataset]:
  """Returns the split's size and this process's part of it, decoded and cached."""
  if data_dir is not None and not os.path.isdir(data_dir):
    raise ValueError(f'data_dir {data_dir!r} does not exist')
  builder = tfds.builder(info.name, data_dir=data_dir)
  if data_dir is None:
    # TFDS's default folder: download and prepare the dataset the first time, as
    # tfds.load does (a no-op once prepared). A data_dir given by the user must
    # already hold it.
    try:
      builder.download_and_prepare()
    except Exception as e:  # network and mirror errors come in many types
      detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
      raise ValueError(
          f'cannot download {info.name!r} into the TFDS folder {builder.data_dir!r} '
          f'({type(e).__name__}: {detail[:200]}); set data_dir to a prepared TFDS folder'
      ) from None
  try:
    # TFDS (and its mock) attach the exact split size to the dataset, so this
    # reads nothing. `as_dataset` never downloads.
    num_examples = int(builder.as_dataset(split=split).cardinality())
  except AssertionError:  # how TFDS reports a dataset that is not prepared
    raise ValueError(
        f'dataset {info.name!r} is not prepared in data_dir {data_dir!r} '
        f'(nothing at {builder.data_dir}); leave data_dir unset to download it'
    ) from None
  except ValueError as e:
    raise ValueError(
        f'split {split!r} rejected for {info.name!r}: {str(e).splitlines()[0]}'
    ) from None
  # A fixed read order makes the shuffles below reproducible.
  ds = builder.as_dataset(
      split=tfds.split_for_jax_process(split), shuffle_files=False
  )
  # 'index': the example's position in the split as read here (memory-bank methods
  # such as CRD keep a row per example). With several processes it is the position in
  # this process's part.
  ds = ds.enumerate().map(
      lambda i, ex: {'image': ex['image'], 'label': tf.cast(ex['label'], tf.int32),
                     'index': tf.cast(i, tf.int32)},
      num_parallel_calls=tf.data.AUTOTUNE,
  )
  # Decode the PNGs once; the uint8 images stay in memory (150 MB for CIFAR).
  return num_examples, ds.cache()


def load_arrays(
    dataset: str, split: str, data_dir: Optional[str]
) -> tuple[np.ndarray, np.ndarray]:
  """The whole split: uint8 images [N, 32, 32, 3] and int32 labels [N], in TFDS's order.

  For the on-device path (kd_jax.device_data). Every process loads the whole
  split: that path splits the global batches between devices, not the data.
  """
  info = get_dataset_info(dataset)
  # For its checks and errors only: its dataset is this process's part.
  num_examples, _ = _open_split(info, split, data_dir)
  ds = tfds.builder(info.name, data_dir=data_dir).as_dataset(
      split=split, shuffle_files=False
  )
  ds = ds.map(
      lambda ex: (ex['image'], tf.cast(ex['label'], tf.int32)),
      num_parallel_calls=tf.data.AUTOTUNE,
  )
  ds = ds.batch(num_examples).with_options(_options())
  images, labels = ds.get_single_element()
  return images.numpy(), labels.numpy()


def _normalize(image: tf.Tensor, info: DatasetInfo) -> tf.Tensor:
  image = tf.cast(image, tf.float32) / 255.0
  return (image - tf.constant(info.mean)) / tf.constant(info.std)


def _augment(image: tf.Tensor, key: tf.Tensor, padding_mode: str = 'reflect') -> tf.Tensor:
  """Pad (reflect or zero), random crop and random horizontal flip."""
  crop_key, flip_key = tf.unstack(tf.random.experimental.stateless_split(key))
  p = CROP_PADDING
  padded = tf.pad(image, [[p, p], [p, p], [0, 0]],
                  mode={'reflect': 'REFLECT', 'zero': 'CONSTANT'}[padding_mode])
  image = tf.image.stateless_random_crop(padded, tf.shape(image), seed=crop_key)
  return tf.image.stateless_random_flip_left_right(image, seed=flip_key)


def _options() -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = True
  return options


def split_size(dataset: str, split: str, data_dir: Optional[str]) -> int:
  """The number of examples of a split (read from the TFDS metadata, not the data)."""
  return _open_split(get_dataset_info(dataset), split, data_dir)[0]


class TrainData:
  """Shuffled (and by default augmented) training epochs of one split."""

  def __init__(
      self,
      dataset: str,
      split: str,
      global_batch_size: int,
      seed: int,
      data_dir: Optional[str],
      augment: bool = True,
      padding_mode: str = 'reflect',
      info: Optional[DatasetInfo] = None,
  ):
    self.info = info or get_dataset_info(dataset)
    self.padding_mode = padding_mode
    self.local_batch_size = _check_batch_size(global_batch_size)
    self.num_examples, self._cached = _open_split(self.info, split, data_dir)
    # Processes get even splits of the split, differing by at most one example:
    # every process can serve the steps that its smallest part allows. As the
    # global batch is a multiple of the process count this equals
    # num_examples // global_batch_size (the last partial batch is dropped).
    smallest_part = self.num_examples // jax.process_count()
    self.steps_per_epoch = smallest_part // self.local_batch_size
    if self.steps_per_epoch == 0:
      raise ValueError(
          f'global_batch_size {global_batch_size} is larger than the '
          f'{self.num_examples} examples of split {split!r}'
      )
    self.seed = seed
    self.augment = augment

  def epoch(self, epoch: int, start_step: int = 0) -> Iterator[dict]:
    """Yields batches start_step..steps_per_epoch-1 of the given epoch."""
    if not 0 <= start_step <= self.steps_per_epoch:
      raise ValueError(
          f'start_step {start_step} is outside 0..{self.steps_per_epoch}'
      )
    # Different processes hold different examples: give each its own streams.
    seeds = np.random.SeedSequence([self.seed, epoch, jax.process_index()])
    shuffle_seed, *augment_key = seeds.generate_state(3, np.uint32).tolist()
    augment_key = tf.constant(augment_key, tf.int64)

    def prepare(index, example):
      image = example['image']
      if self.augment:
        key = tf.random.experimental.stateless_fold_in(augment_key, index)
        image = _augment(image, key, self.padding_mode)
      return {'image': _normalize(image, self.info), 'label': example['label'],
              'index': example['index']}

    # tf.data combines this seed with TF's global seed: never set that one.
    ds = self._cached.shuffle(
        self.num_examples, seed=shuffle_seed, reshuffle_each_iteration=False
    )
    # Skip before augmenting: resuming costs no augmentation work.
    ds = ds.enumerate().skip(start_step * self.local_batch_size)
    ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(self.local_batch_size, drop_remainder=True)
    ds = ds.take(self.steps_per_epoch - start_step)
    ds = ds.prefetch(tf.data.AUTOTUNE).with_options(_options())
    return iter(tfds.as_numpy(ds))


class EvalData:
  """Every example of a split exactly once, in order; the padding is masked out."""

  def __init__(
      self,
      dataset: str,
      split: str,
      global_batch_size: int,
      data_dir: Optional[str],
      info: Optional[DatasetInfo] = None,
  ):
    self.info = info or get_dataset_info(dataset)
    self.local_batch_size = _check_batch_size(global_batch_size)
    self.num_examples, ds = _open_split(self.info, split, data_dir)
    # No process holds more than ceil(num_examples / process_count) examples,
    # which fit in this many local batches: all processes yield the same count.
    self.num_batches = math.ceil(self.num_examples / global_batch_size)
    ds = ds.map(
        lambda ex: {
            'image': _normalize(ex['image'], self.info),
            'label': ex['label'],
            'mask': True,
        },
        num_parallel_calls=tf.data.AUTOTUNE,
    )
    padding = tf.data.Dataset.from_tensors({
        'image': tf.zeros(self.info.image_shape, tf.float32),
        'label': tf.constant(0, tf.int32),
        'mask': False,
    }).repeat()
    ds = ds.concatenate(padding).take(self.num_batches * self.local_batch_size)
    ds = ds.batch(self.local_batch_size)
    self._ds = ds.prefetch(tf.data.AUTOTUNE).with_options(_options())

  def __iter__(self) -> Iterator[dict]:
    return iter(tfds.as_numpy(self._ds))
