"""Whether the terminal draws real pixels (Kitty's graphics protocol or Sixel), found out
once before Textual starts: the terminal must be asked while nothing else reads its
answers. Where it does and textual-image is installed (the `graphics` extra), the Media
tab shows images through textual-image; everywhere else in our own half blocks
(widgets/half_blocks.py), which need nothing."""

from __future__ import annotations

import os
import sys

ENV = "EXPMAN_TUI_GRAPHICS"  # "off": half blocks even where the terminal has a graphics protocol

_picture: type | None = None  # textual-image's widget for the protocol found, or None: half blocks
_kind: str | None = None


def detect() -> str | None:
    """Ask the terminal (≤ 0.2 s) and remember the answer: "tgp", "sixel", or None (half
    blocks: no terminal, no protocol, textual-image missing, or EXPMAN_TUI_GRAPHICS=off)."""
    global _picture, _kind
    if os.environ.get(ENV, "").strip().lower() in ("off", "0", "no", "false"):
        return None
    if not all(s is not None and s.isatty() for s in (sys.__stdin__, sys.__stdout__)):
        return None
    try:
        from textual_image import renderable, widget  # importing asks the terminal
    except Exception:  # not installed, or the terminal could not be asked: half blocks
        return None
    kinds = {renderable.TGPImage: "tgp", renderable.SixelImage: "sixel"}
    kind = kinds.get(renderable.Image)
    if kind is not None:
        _picture, _kind = widget.Image, kind
    return kind


def picture_widget() -> type | None:
    """The widget class that draws an image with the terminal's protocol, or None."""
    return _picture


def use(picture: type | None, kind: str | None = None) -> None:
    """Set what detect() would (tests, and a program that knows its terminal)."""
    global _picture, _kind
    _picture, _kind = picture, kind
