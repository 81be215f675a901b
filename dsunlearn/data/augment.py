"""Light image augmentation for the learn stage.

A fresh random shift, rescale, brightness change and noise at every step makes the tiny
vision tower learn the identity (colours and shapes) instead of the few training pixels,
which is what lets it recognise the held-out images.
"""

from __future__ import annotations

import numpy as np
from PIL import Image


def augment_image(img: Image.Image, rng: np.random.Generator, max_shift: int = 3) -> Image.Image:
    w, h = img.size
    scale = rng.uniform(0.9, 1.1)
    sw, sh = max(1, round(w * scale)), max(1, round(h * scale))
    a = np.asarray(img.convert("RGB").resize((sw, sh), Image.BILINEAR), dtype=np.float32)
    # Pad with the edge colour (the plain background), then crop back to w x h at an offset.
    pad = max_shift + max(0, w - sw, h - sh)
    a = np.pad(a, ((pad, pad), (pad, pad), (0, 0)), mode="edge")
    cy = (a.shape[0] - h) // 2 + int(rng.integers(-max_shift, max_shift + 1))
    cx = (a.shape[1] - w) // 2 + int(rng.integers(-max_shift, max_shift + 1))
    a = a[cy : cy + h, cx : cx + w]
    a = a * rng.uniform(0.9, 1.1) + rng.normal(0.0, 4.0, size=a.shape)
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))
