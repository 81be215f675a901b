"""Rephrased images: the forget people's multiple-choice questions on new views of their faces.

A model that forgot a face should not know it again once the picture is cropped, mirrored,
rotated, recoloured, blurred or JPEG-compressed; on the built-in benchmark, also on newly drawn
renderings of the same person (its generator keeps each person's look). The gold model's
accuracy on the same views is the floor.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

from dsunlearn.audit.context import AuditContext, Source
from dsunlearn.data import faces
from dsunlearn.data.examples import MCExample

CROP_KEEP = 0.8  # share of each side kept around the centre, then resized back
ROTATE_DEG = 15.0
# colour: saturation, brightness and contrast moved, hue kept (on the built-in benchmark a
# person's shirt and hair colours are part of who they are: a hue turn makes someone else)
SATURATION, BRIGHTNESS, CONTRAST = 0.6, 1.15, 0.8
BLUR_RADIUS = 1.0  # Gaussian, in pixels of the original picture
JPEG_QUALITY = 30


def crop(img: Image.Image) -> Image.Image:
    w, h = img.size
    cw, ch = max(1, round(w * CROP_KEEP)), max(1, round(h * CROP_KEEP))
    left, top = (w - cw) // 2, (h - ch) // 2
    return img.crop((left, top, left + cw, top + ch)).resize((w, h), Image.BICUBIC)


def flip(img: Image.Image) -> Image.Image:
    return ImageOps.mirror(img)


def rotate(img: Image.Image) -> Image.Image:
    corner = img.convert("RGB").getpixel((0, 0))  # fill the corners with the background
    return img.rotate(ROTATE_DEG, resample=Image.BICUBIC, fillcolor=corner)


def colour(img: Image.Image) -> Image.Image:
    img = ImageEnhance.Color(img.convert("RGB")).enhance(SATURATION)
    img = ImageEnhance.Brightness(img).enhance(BRIGHTNESS)
    return ImageEnhance.Contrast(img).enhance(CONTRAST)


def blur(img: Image.Image) -> Image.Image:
    return img.filter(ImageFilter.GaussianBlur(BLUR_RADIUS))


def jpeg(img: Image.Image) -> Image.Image:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="JPEG", quality=JPEG_QUALITY)
    buf.seek(0)
    return Image.open(buf).convert("RGB")


TRANSFORMS: dict[str, Callable[[Image.Image], Image.Image]] = {
    "crop": crop,
    "flip": flip,
    "rotate": rotate,
    "colour": colour,
    "blur": blur,
    "jpeg": jpeg,
}


def redrawn_views(
    appearance: dict[str, str], n: int, size: int, seed: int, avoid: list[Image.Image]
) -> list[Image.Image]:
    """`n` new renderings of one built-in person (its look from benchmark.json), none with the
    bytes of a picture in `avoid` (its training and held-out pictures)."""
    identity = faces.Identity(**appearance)
    rng = np.random.default_rng(seed)
    taken = {faces.png_bytes(im) for im in avoid}
    out: list[Image.Image] = []
    while len(out) < n:
        img = faces.render_face(identity, rng, size)
        png = faces.png_bytes(img)
        if png not in taken:
            taken.add(png)
            out.append(img)
    return out


def view_items(ctx: AuditContext, name: str) -> list[MCExample]:
    """The forget people's image questions on the views `name` makes of their pictures."""
    items = []
    for i, r in enumerate(ctx.sets.forget_records):
        if name == "redraw":
            look = ctx.appearance.get(r.id)
            if look is None:
                return []  # not the built-in benchmark: no generator to draw from
            size = r.images[0].size[0]
            views = redrawn_views(look, ctx.cfg.redraw_views, size, ctx.seed * 1000 + i, r.images)
        else:
            views = [TRANSFORMS[name](im) for im in r.images]
        items += [
            MCExample(m.question, list(m.options), m.answer_index, v, r.id)
            for v in views
            for m in r.mc_image
        ]
    return items


def rephrased_images(ctx: AuditContext, source: Source) -> dict[str, Any]:
    """{"original": acc, view: acc, ...}: forget VQA on the training pictures and on each view
    (nan where a view cannot be made: "redraw" outside the built-in benchmark)."""
    views = {name: view_items(ctx, name) for name in ctx.cfg.rephrase}
    out: dict[str, Any] = {}
    with ctx.frozen(source) as (model, processor):
        out["original"] = ctx.mc_accuracy(model, processor, ctx.sets.forget_vqa)
        for name, items in views.items():
            out[name] = ctx.mc_accuracy(model, processor, items) if items else float("nan")
    return out
