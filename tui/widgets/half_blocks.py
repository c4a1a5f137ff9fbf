"""Pixels as terminal text: each cell an upper half block (▀), its foreground the upper
pixel and its background the lower one, so a cell shows two pixels in 24-bit colour.
Works in every terminal Textual drives (and in the browser with --serve); images and
histogram heatmaps both draw through it."""

from __future__ import annotations

import numpy as np
from rich.color import Color
from rich.style import Style
from rich.text import Text

UPPER = "▀"

# A perceptual ramp (viridis' anchors) for counts: dark for none, yellow for the most.
_RAMP = np.array([(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)], dtype=float)


def pixels_text(rgb: np.ndarray) -> Text:
    """An (H, W, 3) uint8 array as H/2 lines of W half-block cells (an odd last row on black)."""
    rgb = np.asarray(rgb, dtype=np.uint8)
    if rgb.shape[0] % 2:
        rgb = np.concatenate([rgb, np.zeros((1, *rgb.shape[1:]), dtype=np.uint8)])
    text = Text(no_wrap=True, overflow="crop")
    styles: dict[tuple, Style] = {}
    for y in range(0, rgb.shape[0], 2):
        if y:
            text.append("\n")
        top, bottom = rgb[y].tolist(), rgb[y + 1].tolist()
        for t, b in zip(top, bottom):
            pair = (*t, *b)
            style = styles.get(pair)
            if style is None:
                style = styles[pair] = Style(color=Color.from_rgb(*t), bgcolor=Color.from_rgb(*b))
            text.append(UPPER, style)
    return text


def ramp(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] as RGB uint8 along the ramp (NaN as black)."""
    v = np.clip(np.nan_to_num(np.asarray(values, dtype=float), nan=0.0), 0.0, 1.0)
    at = v * (len(_RAMP) - 1)
    lo = np.floor(at).astype(int)
    hi = np.minimum(lo + 1, len(_RAMP) - 1)
    frac = (at - lo)[..., None]
    return (_RAMP[lo] * (1 - frac) + _RAMP[hi] * frac).round().astype(np.uint8)
