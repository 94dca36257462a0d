"""ImageNet-1k (ILSVRC 2012) for the full LQAE run, read by random access from a prepared TFDS copy.

Storage. TFDS ``imagenet2012`` prepared in the ``array_record`` file format. ``builder.as_data_source``
then gives random access (``source[i]``) with no TensorFlow at training time, which is what the
deterministic batch iterator (``data/batches.py``) needs. JPEG bytes are decoded here with PIL.

Preparing (once, on one machine). TFDS cannot download ImageNet: register at image-net.org, put
``ILSVRC2012_img_train.tar`` and ``ILSVRC2012_img_val.tar`` in ``manual_dir``, then either call
:func:`imagenet_source` with ``manual_dir`` set, or run
``tfds build imagenet2012 --data_dir=DATA_DIR --manual_dir=MANUAL_DIR --file_format=array_record``.
The TFDS ImageNet builder itself needs TensorFlow for this one-time conversion (and tfds 4.9 also
wants ``importlib_resources``: ``pip install tensorflow importlib_resources``); reading the prepared
copy needs neither. A copy already prepared as TFRecord can be converted
with ``tfds convert_format --dataset_version_dir=... --out_file_format=array_record``.

Augmentation, as the LQAE release (``lqae/data/data.py`` ImageNetDataset, transform_type
'pretrain' and 'test'):
  train: RandomResizedCrop(S, scale=(0.2, 1.0), ratio=(3/4, 4/3), bicubic) + horizontal flip (p=0.5).
  eval:  resize the shorter side to S (bicubic) + center crop S x S (no 256/224-style margin).
Pixels leave here as uint8; the method turns them into floats on the device. The release fed the
model ToTensor's [0, 1] pixels with no mean/std (image_normalization 'none'), which is LQAE's
``config.model.pixel_range=(0.0, 1.0)`` in configs/lqae_roberta.py (methods/lqae.py, ops/pixels.py).
"""

from __future__ import annotations

import operator
import os
from collections.abc import Callable
from typing import Any

import numpy as np

from lqae_vlap.data.images import decode_image
from lqae_vlap.data.preprocess import center_crop, random_resized_crop, resize_shorter_side

DATASET_NAME = "imagenet2012"
MANUAL_FILES = {"train": "ILSVRC2012_img_train.tar", "validation": "ILSVRC2012_img_val.tar"}
# The TFDS 'test' split has no labels (-1), so it is no use for training or accuracy.
IMAGENET_SPLITS = ("train", "validation")
TRAIN_SCALE = (0.2, 1.0)
TRAIN_RATIO = (3.0 / 4.0, 4.0 / 3.0)


def _import_tfds() -> Any:
    try:
        import tensorflow_datasets as tfds  # optional: only the ImageNet path needs it
    except ImportError as e:
        raise ImportError(
            "ImageNet is read through tensorflow-datasets, which is not installed: "
            "pip install tensorflow-datasets array_record"
        ) from e
    return tfds


def _base_split(split: str) -> str:
    # TFDS slicing syntax ('train[:10000]', 'train[99%:]') selects part of a named split.
    return split.split("[", 1)[0].strip()


class ImageNetSource:
    """Random-access ImageNet examples: ``source[i] -> {'image': uint8, 'label': int32}``.

    Deterministic work only: decode, and for evaluation (``train=False``) the resize + center crop
    to ``[S, S, 3]``. Training examples come back at full resolution ``[H, W, 3]``; the random crop
    and flip are ``augment`` (:func:`imagenet_preprocess`), the batch iterator's ``preprocess``,
    which draws from a generator seeded per example position.
    """

    def __init__(self, data_source: Any, *, image_size: int, train: bool, class_names: list[str]) -> None:
        self.data_source = data_source
        self.image_size = image_size
        self.train = train
        self.class_names = tuple(class_names)
        self.num_classes = len(self.class_names)
        # A training split crops and flips its full-size images per step (the batch iterator
        # calls augment with a generator seeded by the example's position).
        self.augment = imagenet_preprocess(image_size, train=True) if train else None

    def __len__(self) -> int:
        return len(self.data_source)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        i = operator.index(index)
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {index} out of range for an ImageNet split of {len(self)} examples")
        record = self.data_source[i % len(self)]
        image = decode_image(record["image"], f"ImageNet record {i % len(self)}")
        if not self.train:
            image = eval_crop(image, self.image_size)
        return {"image": image, "label": np.int32(record["label"])}


def eval_crop(image: np.ndarray, image_size: int) -> np.ndarray:
    """Resize the shorter side to S (bicubic), then the central S x S. [H, W, 3] -> [S, S, 3]."""
    return center_crop(resize_shorter_side(image, image_size, "bicubic"), image_size)


def imagenet_preprocess(
    image_size: int,
    train: bool,
    *,
    scale: tuple[float, float] = TRAIN_SCALE,
    ratio: tuple[float, float] = TRAIN_RATIO,
    flip: bool = True,
) -> Callable[[dict[str, Any], np.random.Generator], dict[str, Any]]:
    """The per-example ``preprocess(example, rng)`` for ``IndexedBatches`` (module docstring).

    train=True: random resized crop + horizontal flip from ``rng``; train=False: :func:`eval_crop`
    (ignores ``rng``; idempotent, so it is harmless on an eval source that already cropped).
    example['image']: uint8 [H, W, 3] (or encoded bytes) -> uint8 [S, S, 3].
    """
    size = operator.index(image_size)
    if size <= 0:
        raise ValueError(f"image_size must be a positive integer, got {image_size}")

    def preprocess(example: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        image = decode_image(example["image"])
        if train:
            image = random_resized_crop(image, size, rng, scale=scale, ratio=ratio, resample="bicubic")
            if flip and rng.random() < 0.5:
                image = image[:, ::-1]
        else:
            image = eval_crop(image, size)
        return {**example, "image": np.ascontiguousarray(image)}

    return preprocess


def _check_manual_dir(manual_dir: str | os.PathLike | None, data_dir: str, split: str) -> None:
    expected = ", ".join(MANUAL_FILES.values())
    if manual_dir is None:
        raise FileNotFoundError(
            f"ImageNet is not prepared under data_dir={data_dir!r} and no manual_dir was given. Download "
            f"{expected} from https://image-net.org (registration needed), put them in one folder and "
            "pass it as manual_dir; TFDS then converts them once into data_dir."
        )
    manual_dir = os.fspath(manual_dir)
    if not os.path.isdir(manual_dir):
        raise FileNotFoundError(
            f"manual_dir {manual_dir!r} does not exist. It must be the folder holding {expected} "
            "(downloaded from https://image-net.org after registering)."
        )
    needed = MANUAL_FILES.get(_base_split(split))
    if needed and not os.path.isfile(os.path.join(manual_dir, needed)):
        present = sorted(os.listdir(manual_dir))[:10]
        raise FileNotFoundError(
            f"manual_dir {manual_dir!r} lacks {needed} (needed for split {split!r}); it holds {present}. "
            f"Put {expected} there."
        )


def imagenet_source(
    split: str,
    *,
    data_dir: str | os.PathLike,
    manual_dir: str | os.PathLike | None = None,
    image_size: int,
    train: bool,
    dataset_name: str = DATASET_NAME,
    prepare: bool = True,
) -> ImageNetSource:
    """A random-access ImageNet split from TFDS (array_record); see the module docstring.

    Args:
      split: 'train' or 'validation', optionally sliced TFDS-style ('train[:99%]').
      data_dir: where the prepared dataset lives (or will be written).
      manual_dir: folder with ILSVRC2012_img_train.tar / ILSVRC2012_img_val.tar; only needed to prepare.
      image_size: S, the side of the model's input images.
      train: False makes examples [S, S, 3] eval crops; True keeps them full size for the random crop.
      dataset_name: the TFDS builder; another name (e.g. a prepared 'imagenet2012_subset/1pct' or a
        test builder) must have 'image' and 'label' features.
      prepare: if the dataset is not prepared, convert the tar files now. In a multi-host run, prepare
        once beforehand and pass prepare=False so processes never race to write the same files.
    """
    size = operator.index(image_size)
    if size <= 0:
        raise ValueError(f"image_size must be a positive integer, got {image_size}")
    base = _base_split(split)
    if dataset_name == DATASET_NAME and base not in IMAGENET_SPLITS:
        raise ValueError(f"unknown ImageNet split {split!r}; use one of {IMAGENET_SPLITS} (TFDS slices allowed)")
    tfds = _import_tfds()
    data_dir = os.fspath(data_dir)
    builder = tfds.builder(dataset_name, data_dir=data_dir, file_format="array_record")
    if not builder.is_prepared():
        if not prepare:
            raise FileNotFoundError(
                f"{dataset_name} is not prepared under {data_dir!r}; prepare it once (imagenet_source with "
                "manual_dir and prepare=True, or `tfds build imagenet2012 --data_dir=... --manual_dir=... "
                "--file_format=array_record`)."
            )
        if dataset_name == DATASET_NAME:
            _check_manual_dir(manual_dir, data_dir, split)
        download_config = tfds.download.DownloadConfig(
            manual_dir=None if manual_dir is None else os.fspath(manual_dir)
        )
        try:
            builder.download_and_prepare(download_config=download_config)
        except ModuleNotFoundError as e:
            # TFDS's ImageNet builder uses tf.io.gfile, and tfds 4.9 imports importlib_resources
            # while preparing without declaring it on Python >= 3.9.
            if e.name not in ("tensorflow", "importlib_resources"):
                raise
            raise ImportError(
                f"preparing {dataset_name} (the one-time conversion of the tar files) needs the package "
                f"{e.name!r}: pip install tensorflow importlib_resources. Reading the prepared array_record "
                "copy afterwards needs neither."
            ) from e
    available = list(builder.info.splits)
    if base not in available:
        raise ValueError(f"split {split!r} not found in {dataset_name} at {data_dir!r}; available: {available}")
    features = builder.info.features
    decoders = None
    if isinstance(features["image"], tfds.features.Image):
        # Full-size decoding happens in our threads with PIL, after the cheap record read.
        decoders = {"image": tfds.decode.SkipDecoding()}
    try:
        data_source = builder.as_data_source(split, decoders=decoders)
    except NotImplementedError as e:
        raise NotImplementedError(
            f"{dataset_name} under {data_dir!r} is not stored as array_record, which random access needs. "
            "Convert it: tfds convert_format --dataset_version_dir=<that version folder> "
            "--out_file_format=array_record"
        ) from e
    return ImageNetSource(
        data_source,
        image_size=size,
        train=train,
        class_names=list(features["label"].names),
    )
