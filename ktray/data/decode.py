"""Decoding: encoded image bytes -> RGB uint8 arrays, centre or random-resized crops.

Every image mode (greyscale, CMYK, palette, 16-bit, alpha) becomes RGB; alpha is composited on
white; images over ``MAX_PIXELS`` are refused before their pixels are decoded (decompression
bombs). :func:`decode_batch` is the Ray Data task every stage decodes with: undecodable images
are dropped and counted, never fatal.
"""

from __future__ import annotations

import io
import logging
import re
from typing import Literal

import numpy as np
from PIL import Image, ImageOps

from ktray import metrics

log = logging.getLogger(__name__)


# Larger images are refused before their pixels are decoded (decompression-bomb guard):
# ImageNet's largest photos are ~4000x3000 = 12 Mpx; 10000x10000 is refused.
MAX_PIXELS = 64_000_000


class DecodeError(ValueError):
    """Bytes that are not a decodable image within the limits."""


def open_rgb(data: bytes, draft_size: int | None = None) -> Image.Image:
    """Open encoded bytes as an RGB PIL image, or raise DecodeError saying why.

    Greyscale, palette and CMYK become RGB; alpha is composited onto white; 16-bit
    images are scaled to 8 bits. ``draft_size`` lets JPEG decode at a reduced scale
    (DCT scaling), which is exact enough for any target at least that large and
    several times faster.
    """
    if not data:
        raise DecodeError("empty file")
    try:
        img = Image.open(io.BytesIO(data))
        w, h = img.size
        if w * h > MAX_PIXELS:
            raise DecodeError(f"{w}x{h} exceeds the {MAX_PIXELS:,} pixel limit (decompression-bomb guard)")
        if draft_size is not None and img.format == "JPEG":
            img.draft("RGB", (draft_size, draft_size))
        img.load()
        img = ImageOps.exif_transpose(img)
    except DecodeError:
        raise
    except Exception as exc:  # PIL raises many types for bad data; all mean "skip this file"
        # The reason is recorded in reports: the same on every run (no object addresses).
        raise DecodeError(re.sub(r" at 0x[0-9a-fA-F]+", "", f"{type(exc).__name__}: {exc}")) from None
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.uint32)
        img = Image.fromarray((arr >> 8).clip(0, 255).astype(np.uint8))
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
    if img.mode != "RGB":
        img = img.convert("RGB")
    if min(img.size) < 1:
        raise DecodeError("image has no pixels")
    return img


def _random_resized_box(
    w: int, h: int, rng: np.random.Generator, scale: tuple[float, float] = (0.08, 1.0)
) -> tuple[int, int, int, int]:
    """Inception-style random crop box (area scale, aspect 3/4..4/3), as torchvision's."""
    area = w * h
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        cw, ch = round(np.sqrt(target * aspect)), round(np.sqrt(target / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            return x, y, x + cw, y + ch
    side = min(w, h)  # fall back to a center square
    return (w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side


def decode_image(
    data: bytes,
    size: int,
    mode: Literal["center", "random"] = "center",
    rng: np.random.Generator | None = None,
) -> np.ndarray | None:
    """Encoded bytes -> uint8 (size, size, 3), or None when the bytes are not an image.

    ``center``: resize the short side to ``size`` and take the center square (evaluation).
    ``random``: random resized crop and horizontal flip (training augmentation).
    """
    try:
        img = open_rgb(data, draft_size=size)
    except DecodeError:
        return None
    w, h = img.size
    if mode == "center":
        side = min(w, h)
        box = ((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side)
    else:
        rng = rng if rng is not None else np.random.default_rng()
        box = _random_resized_box(w, h, rng)
    out = np.asarray(img.resize((size, size), Image.BILINEAR, box=box), dtype=np.uint8)
    if mode == "random" and rng.random() < 0.5:
        out = out[:, ::-1]
    return np.ascontiguousarray(out)


def decode_batch(
    batch: dict[str, np.ndarray],
    size: int,
    mode: Literal["center", "random"] = "center",
    seed: int | None = None,
    stage: str = "data",
) -> dict[str, np.ndarray]:
    """Ray Data ``map_batches`` function: decode a batch of image rows.

    Returns ``image_id``, ``pixels`` (N, size, size, 3) uint8 and ``label`` (int32, -1 when
    unlabeled), and ``split`` when the batch has one. Rows whose bytes do not decode are dropped
    and logged, so one bad image never stops a stage. Decoded and failed counts go to the ``ktray_images_*`` metrics.
    """
    rng = np.random.default_rng(seed)
    ids, pixels, labels, kept = [], [], [], []
    raw_labels = batch.get("label")
    for i, (image_id, data) in enumerate(zip(batch["image_id"], batch["image"])):
        arr = decode_image(bytes(data), size, mode, rng)
        if arr is None:
            log.warning("skipping undecodable image %s", image_id)
            continue
        ids.append(image_id)
        pixels.append(arr)
        kept.append(i)
        label = None if raw_labels is None else raw_labels[i]
        labels.append(-1 if label is None or (isinstance(label, float) and np.isnan(label)) else int(label))
    metrics.record_decode(ok=len(ids), failed=len(batch["image_id"]) - len(ids), stage=stage)
    out = {
        "image_id": np.asarray(ids, dtype=object),
        "pixels": np.stack(pixels) if pixels else np.zeros((0, size, size, 3), np.uint8),
        "label": np.asarray(labels, dtype=np.int32),
    }
    if "split" in batch:  # kept when present, so several splits can share one pass
        out["split"] = np.asarray(batch["split"], dtype=object)[kept]
    return out
