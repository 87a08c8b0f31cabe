"""Ray Data pipelines for training: stream image/mask pairs from storage, decode, resize, augment.

The dataset rows are URIs (a manifest built by ``basnet.data.discover``); the bytes are read
inside ``map_batches`` through ``basnet.storage``, so the same code reads local disk and S3, and
a file that fails to decode is recorded and skipped instead of failing the epoch.
"""

from __future__ import annotations

import logging

import numpy as np
import ray
import ray.data

from basnet import storage
from basnet.data.discovery import Pair
from basnet.imaging import ImageDecodeError, decode_for_model, decode_mask
from basnet.transforms import resize_mask

logger = logging.getLogger(__name__)

__all__ = ["pairs_dataset", "training_dataset", "validation_dataset"]


def pairs_dataset(pairs: list[Pair]) -> ray.data.Dataset:
    """One row per pair; enough blocks that decoding spreads over the cluster."""
    rows = [{"image": p.image, "mask": p.mask} for p in pairs]
    return ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows) // 8, 200)))


def _load_pair(image_uri: str, mask_uri: str, size: int) -> tuple[np.ndarray, np.ndarray] | None:
    try:
        image = decode_for_model(storage.read_bytes(image_uri), size)  # reduced for a large JPEG, as masking does
        mask = decode_mask(storage.read_bytes(mask_uri))
    except (ImageDecodeError, OSError) as exc:
        logger.warning("skipping %s: %s", image_uri, exc)
        return None
    return image.image, resize_mask(mask, size)


def load_batch(batch: dict[str, np.ndarray], *, size: int) -> dict[str, np.ndarray]:
    """Decodes a batch of pairs and resizes them to ``size``; unreadable pairs are logged and left out."""
    images, masks = [], []
    for image_uri, mask_uri in zip(batch["image"], batch["mask"]):
        loaded = _load_pair(str(image_uri), str(mask_uri), size)
        if loaded is not None:
            images.append(loaded[0])
            masks.append(loaded[1])
    return {
        "image": np.stack(images) if images else np.zeros((0, size, size, 3), np.uint8),
        "mask": np.stack(masks) if masks else np.zeros((0, size, size), np.uint8),
    }


def training_dataset(pairs: list[Pair], *, image_size: int, seed: int) -> ray.data.Dataset:
    """Decoded and resized to ``image_size``, in a seeded random block order.

    The paper's random crop and flip happen in the training loop, with a generator seeded by the
    run's seed and the epoch: each epoch sees new crops, and a run is reproducible. A block
    order instead of a full ``random_shuffle`` keeps the epoch streaming (no all-to-all barrier
    before its first batch); the loop's local shuffle buffer mixes rows across blocks.
    """
    return pairs_dataset(pairs).randomize_block_order(seed=seed).map_batches(
        load_batch, fn_kwargs={"size": image_size}, batch_size=8, batch_format="numpy")


def validation_dataset(pairs: list[Pair], *, image_size: int) -> ray.data.Dataset:
    """Resized to the training size, no augmentation."""
    return pairs_dataset(pairs).map_batches(load_batch, fn_kwargs={"size": image_size}, batch_size=8,
                                            batch_format="numpy")
