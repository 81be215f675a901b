"""Procedural face-like portraits for the built-in benchmark's fictitious people.

A person's visual identity is a small tuple of discrete attributes (skin tone, hair colour, hair
style, eye colour, shirt colour, face shape, accessory). Identities are chosen so that every pair
differs in at least two attributes, with the large, saturated areas (shirt, hair, skin) differing
first: a from-scratch ViT on 32x32 inputs learns colour blobs far more easily than small shapes.

Each rendering of an identity differs in position, scale, colour jitter and light noise, on a plain
pastel background (busy backgrounds defeat tiny ViTs, see notes/tiny-mllm-facts.md). Everything
is deterministic given a `numpy.random.Generator`.
"""

from __future__ import annotations

import io
import itertools
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

RGB = tuple[int, int, int]

# Attribute palettes. Colours are far apart so that a 2x2-pixel patch already tells them apart.
SKIN_TONES: dict[str, RGB] = {
    "porcelain": (250, 218, 196),
    "tan": (214, 160, 112),
    "brown": (150, 96, 58),
    "deep": (92, 56, 36),
}
HAIR_COLOURS: dict[str, RGB] = {
    "black": (24, 22, 24),
    "blonde": (240, 206, 90),
    "ginger": (206, 84, 26),
    "silver": (172, 176, 190),
    "teal": (20, 150, 150),
    "violet": (128, 52, 178),
    "pink": (236, 90, 170),
}
HAIR_STYLES: tuple[str, ...] = ("short", "long", "bun", "spiky")
EYE_COLOURS: dict[str, RGB] = {
    "brown": (96, 52, 20),
    "blue": (40, 110, 230),
    "green": (40, 170, 60),
}
SHIRT_COLOURS: dict[str, RGB] = {
    "red": (214, 30, 36),
    "green": (30, 160, 60),
    "blue": (30, 60, 200),
    "yellow": (246, 210, 20),
    "purple": (120, 30, 150),
    "orange": (246, 130, 20),
    "cyan": (30, 200, 230),
    "black": (30, 30, 34),
}
FACE_SHAPES: tuple[str, ...] = ("round", "oval", "square")
ACCESSORIES: tuple[str, ...] = ("none", "glasses", "hat")
# Plain, light backgrounds: far from every shirt colour and from the skin tones.
BACKGROUNDS: tuple[RGB, ...] = (
    (214, 228, 244),  # pale blue
    (222, 242, 226),  # mint
    (236, 226, 246),  # lavender
    (246, 244, 218),  # cream
    (230, 230, 230),  # light grey
    (244, 226, 232),  # blush
)
HAT_COLOUR: RGB = (70, 70, 78)
GLASSES_COLOUR: RGB = (16, 16, 16)

# (attribute name, number of values, weight in the identity distance): colour areas weigh most.
_ATTRIBUTES: tuple[tuple[str, int, float], ...] = (
    ("skin", len(SKIN_TONES), 2.0),
    ("hair_colour", len(HAIR_COLOURS), 3.0),
    ("hair_style", len(HAIR_STYLES), 1.5),
    ("eye_colour", len(EYE_COLOURS), 0.5),
    ("shirt", len(SHIRT_COLOURS), 3.0),
    ("face_shape", len(FACE_SHAPES), 1.0),
    ("accessory", len(ACCESSORIES), 1.5),
)
MIN_DIFFERENT_ATTRIBUTES = 2


@dataclass(frozen=True)
class Identity:
    """The discrete look of one person; every rendering of them shares it."""

    skin: str
    hair_colour: str
    hair_style: str
    eye_colour: str
    shirt: str
    face_shape: str
    accessory: str

    def as_dict(self) -> dict[str, str]:
        return {
            "skin": self.skin,
            "hair_colour": self.hair_colour,
            "hair_style": self.hair_style,
            "eye_colour": self.eye_colour,
            "shirt": self.shirt,
            "face_shape": self.face_shape,
            "accessory": self.accessory,
        }


def _identity_from_codes(codes: np.ndarray) -> Identity:
    s, hc, hs, ec, sh, fs, ac = (int(c) for c in codes)
    return Identity(
        skin=list(SKIN_TONES)[s],
        hair_colour=list(HAIR_COLOURS)[hc],
        hair_style=HAIR_STYLES[hs],
        eye_colour=list(EYE_COLOURS)[ec],
        shirt=list(SHIRT_COLOURS)[sh],
        face_shape=FACE_SHAPES[fs],
        accessory=ACCESSORIES[ac],
    )


def choose_identities(n: int, rng: np.random.Generator) -> list[Identity]:
    """Pick `n` identities by greedy farthest-point search over all attribute combinations.

    The distance is a weighted count of differing attributes (colours weigh most), so people
    first differ in shirt and hair colour, then in skin tone, and so on. Every pair differs in at
    least `MIN_DIFFERENT_ATTRIBUTES` attributes.
    """
    sizes = [size for _, size, _ in _ATTRIBUTES]
    weights = np.array([w for _, _, w in _ATTRIBUTES])
    candidates = np.array(list(itertools.product(*(range(s) for s in sizes))), dtype=np.int8)
    candidates = candidates[rng.permutation(len(candidates))]  # seeded tie-breaking
    if n > len(candidates):
        raise ValueError(f"at most {len(candidates)} distinct identities, asked for {n}")
    chosen: list[int] = [0]
    min_dist = np.full(len(candidates), np.inf)
    min_diff = np.full(len(candidates), np.iinfo(np.int32).max)
    for _ in range(n - 1):
        diff = candidates != candidates[chosen[-1]]
        min_dist = np.minimum(min_dist, diff @ weights)
        min_diff = np.minimum(min_diff, diff.sum(axis=1))
        score = np.where(min_diff >= MIN_DIFFERENT_ATTRIBUTES, min_dist, -1.0)
        best = int(np.argmax(score))
        if score[best] < 0:
            raise ValueError(f"cannot find {n} identities that differ in 2 attributes")
        chosen.append(best)
    return [_identity_from_codes(candidates[i]) for i in chosen[:n]]


@dataclass(frozen=True)
class RenderParams:
    """Per-image variation, drawn fresh for every rendering."""

    dx: float  # centre shift, fraction of the image size
    dy: float
    scale: float
    gain: tuple[float, float, float]  # per-channel colour jitter
    brightness: float
    noise_sigma: float
    background: RGB


def draw_params(rng: np.random.Generator) -> RenderParams:
    """Draw the random variation of one rendering."""
    dx, dy = rng.uniform(-0.08, 0.08, size=2)
    g0, g1, g2 = rng.uniform(0.93, 1.07, size=3)
    return RenderParams(
        dx=float(dx),
        dy=float(dy),
        scale=float(rng.uniform(0.8, 1.1)),
        gain=(float(g0), float(g1), float(g2)),
        brightness=float(rng.uniform(0.9, 1.1)),
        noise_sigma=float(rng.uniform(2.0, 5.0)),
        background=BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))],
    )


_SUPERSAMPLE = 4


def render_face(
    identity: Identity, rng: np.random.Generator, size: int = 32, params: RenderParams | None = None
) -> Image.Image:
    """Render one RGB portrait of `identity` (a new random variation unless `params` is given)."""
    p = params if params is not None else draw_params(rng)
    big = size * _SUPERSAMPLE
    img = Image.new("RGB", (big, big), p.background)
    d = ImageDraw.Draw(img)
    u = big * p.scale / 32.0  # drawing unit: one pixel of a 32x32 image at scale 1
    cx = big / 2 + p.dx * big
    cy = big * 0.44 + p.dy * big  # head centre

    skin = SKIN_TONES[identity.skin]
    hair = HAIR_COLOURS[identity.hair_colour]
    shirt = SHIRT_COLOURS[identity.shirt]

    hw = {"round": 7.4, "oval": 6.3, "square": 7.0}[identity.face_shape] * u  # head half-width
    hh = {"round": 7.6, "oval": 8.6, "square": 7.8}[identity.face_shape] * u  # head half-height
    top = cy - hh

    def box(x0: float, y0: float, x1: float, y1: float) -> list[float]:
        return [x0, y0, x1, y1]

    # Long hair falls behind the shoulders, so draw it first.
    if identity.hair_style == "long":
        d.rounded_rectangle(
            box(cx - hw - 1.8 * u, top - 1.2 * u, cx + hw + 1.8 * u, cy + hh + 3.5 * u),
            radius=5 * u,
            fill=hair,
        )
    # Shoulders and shirt: a big, wide shape at the bottom (the strongest colour cue).
    d.rounded_rectangle(
        box(cx - 14 * u, cy + hh + 0.5 * u, cx + 14 * u, cy + hh + 20 * u), radius=6 * u, fill=shirt
    )
    # Neck.
    d.rectangle(box(cx - 2.4 * u, cy + hh - 2 * u, cx + 2.4 * u, cy + hh + 1.5 * u), fill=skin)
    # Bun sits above the head.
    if identity.hair_style == "bun":
        d.ellipse(box(cx - 3.6 * u, top - 5.2 * u, cx + 3.6 * u, top + 1.5 * u), fill=hair)
    # Head.
    if identity.face_shape == "square":
        d.rounded_rectangle(box(cx - hw, cy - hh, cx + hw, cy + hh), radius=2.2 * u, fill=skin)
    else:
        d.ellipse(box(cx - hw, cy - hh, cx + hw, cy + hh), fill=skin)
    # Hair on top of the head.
    cap = box(cx - hw - 0.8 * u, top - 1.2 * u, cx + hw + 0.8 * u, cy - 0.6 * hh)
    if identity.hair_style in ("short", "long", "bun"):
        d.chord(cap, start=180, end=360, fill=hair)
        d.rectangle(box(cap[0], (cap[1] + cap[3]) / 2, cap[2], cy - 0.55 * hh), fill=hair)
        if identity.hair_style == "long":
            d.rectangle(
                box(cx - hw - 1.8 * u, cy - 0.6 * hh, cx - hw + 1.0 * u, cy + hh), fill=hair
            )
            d.rectangle(
                box(cx + hw - 1.0 * u, cy - 0.6 * hh, cx + hw + 1.8 * u, cy + hh), fill=hair
            )
    elif identity.hair_style == "spiky":
        base = cy - 0.55 * hh
        d.rectangle(box(cx - hw, top + 0.5 * u, cx + hw, base), fill=hair)
        n = 5
        for i in range(n):
            x0 = cx - hw + i * 2 * hw / n
            x1 = x0 + 2 * hw / n
            d.polygon(
                [(x0, top + 1.5 * u), (x1, top + 1.5 * u), ((x0 + x1) / 2, top - 4.0 * u)],
                fill=hair,
            )
    # Eyes: white with a coloured iris.
    ey = cy - 0.05 * hh
    for side in (-1, 1):
        ex = cx + side * 0.42 * hw
        d.ellipse(box(ex - 1.6 * u, ey - 1.1 * u, ex + 1.6 * u, ey + 1.1 * u), fill=(250, 250, 250))
        d.ellipse(
            box(ex - 0.9 * u, ey - 0.9 * u, ex + 0.9 * u, ey + 0.9 * u),
            fill=EYE_COLOURS[identity.eye_colour],
        )
    # Mouth.
    my = cy + 0.5 * hh
    d.rectangle(box(cx - 2.2 * u, my - 0.45 * u, cx + 2.2 * u, my + 0.45 * u), fill=(150, 40, 50))
    # Accessory.
    if identity.accessory == "glasses":
        for side in (-1, 1):
            ex = cx + side * 0.42 * hw
            d.ellipse(
                box(ex - 2.4 * u, ey - 2.0 * u, ex + 2.4 * u, ey + 2.0 * u),
                outline=GLASSES_COLOUR,
                width=max(1, round(0.8 * u)),
            )
        d.line(
            [(cx - 0.42 * hw + 2.4 * u, ey), (cx + 0.42 * hw - 2.4 * u, ey)],
            fill=GLASSES_COLOUR,
            width=max(1, round(0.8 * u)),
        )
    elif identity.accessory == "hat":
        # A small, high hat: the hair stays visible below the brim.
        brim_y = top - 0.6 * u
        d.rectangle(
            box(cx - hw - 2.0 * u, brim_y - 1.0 * u, cx + hw + 2.0 * u, brim_y + 0.4 * u),
            fill=HAT_COLOUR,
        )
        d.rectangle(
            box(cx - hw + 1.5 * u, brim_y - 5.0 * u, cx + hw - 1.5 * u, brim_y - 0.8 * u),
            fill=HAT_COLOUR,
        )

    small = img.resize((size, size), Image.Resampling.BOX)
    arr = np.asarray(small, dtype=np.float32)
    arr = arr * (np.asarray(p.gain, dtype=np.float32) * p.brightness)
    arr = arr + rng.normal(0.0, p.noise_sigma, size=arr.shape).astype(np.float32)
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "RGB")


def png_bytes(image: Image.Image) -> bytes:
    """Encode as PNG; PIL writes no timestamps, so equal pixels give equal bytes."""
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def contact_sheet(rows: list[list[Image.Image]], zoom: int = 4, gap: int = 2) -> Image.Image:
    """Tile images (one row per person) into one picture, for eyeballing identities."""
    size = max(im.width for row in rows for im in row)
    cols = max(len(r) for r in rows)
    cell = size * zoom + gap
    sheet = Image.new("RGB", (cols * cell + gap, len(rows) * cell + gap), (255, 255, 255))
    for r, row in enumerate(rows):
        for c, im in enumerate(row):
            tile = im.resize((im.width * zoom, im.height * zoom), Image.Resampling.NEAREST)
            sheet.paste(tile, (gap + c * cell, gap + r * cell))
    return sheet
