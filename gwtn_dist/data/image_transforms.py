"""ImageNet-style image transforms with PIL and numpy (torchvision does not import here).

Training: decode → random-resized-crop (torchvision's sampling: area 8–100 %, aspect 3/4–4/3,
ten tries then a centre crop) → resize to ``size`` → horizontal flip with p 0.5. Evaluation:
resize the shorter side to ``resize`` → centre crop ``size``. Both return uint8 (H, W, 3);
:func:`normalize` turns a batch into the model's float input.

JPEGs are decoded with PIL's draft mode: libjpeg scales by 1/2, 1/4 or 1/8 while decoding,
as far as the crop still has at least the output resolution, which makes decode several times
cheaper for ImageNet-sized photos.
"""

from __future__ import annotations

import io
import math

import numpy as np
import torch
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def crop_params(width: int, height: int, rng: np.random.Generator,
                scale: tuple[float, float] = (0.08, 1.0),
                ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """A random-resized-crop box ``(top, left, h, w)`` inside a ``width`` × ``height`` image."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height  # fallback: the largest centred crop with an allowed aspect
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _draft(img: Image.Image, min_width: int, min_height: int) -> float:
    """Let libjpeg decode at a reduced scale that keeps ≥ min_width × min_height; the scale."""
    if img.format != "JPEG":
        return 1.0
    full = img.size
    img.draft("RGB", (max(1, min_width), max(1, min_height)))
    return img.size[0] / full[0]


def train_transform(data: bytes, rng: np.random.Generator, size: int = 224) -> np.ndarray:
    """JPEG bytes → random-resized-crop of ``size`` × ``size``, flipped with p 0.5; uint8 (H, W,
    3)."""
    img = Image.open(io.BytesIO(data))
    width, height = img.size
    top, left, h, w = crop_params(width, height, rng)
    flip = rng.random() < 0.5
    # Draft needs the whole image reduced so that the crop still covers ≥ size pixels.
    s = _draft(img, math.ceil(width * size / w), math.ceil(height * size / h))
    box = (left * s, top * s, (left + w) * s, (top + h) * s)
    out = img.convert("RGB").resize((size, size), Image.BILINEAR, box=box)
    if flip:
        out = out.transpose(Image.FLIP_LEFT_RIGHT)
    return np.asarray(out)


def eval_transform(data: bytes, resize: int = 256, size: int = 224) -> np.ndarray:
    """JPEG bytes → shorter side ``resize``, centre ``size`` × ``size`` crop; uint8 (H, W, 3)."""
    img = Image.open(io.BytesIO(data))
    width, height = img.size
    short = min(width, height)
    new_w, new_h = (resize, int(resize * height / width)) if width == short else (
        int(resize * width / height), resize)
    _draft(img, new_w, new_h)
    img = img.convert("RGB").resize((new_w, new_h), Image.BILINEAR)
    top, left = round((new_h - size) / 2.0), round((new_w - size) / 2.0)
    return np.asarray(img.crop((left, top, left + size, top + size)))


def normalize(images: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """uint8 (B, H, W, 3) → float32 (B, 3, H, W), scaled to [0, 1] then standardised per channel."""
    x = images.permute(0, 3, 1, 2).float().div_(255.0)
    m = torch.tensor(mean, dtype=x.dtype).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(1, 3, 1, 1)
    return x.sub_(m).div_(s)
