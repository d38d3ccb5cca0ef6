"""Fonts that draw class names in any script, for ``preview``'s contact sheet (PIL) and the report's plots
(matplotlib). No single font covers every script, so a label is drawn in runs: each character with the first
installed font of ``PREFERRED`` that has a glyph for it, else the first other installed font that has one.

Fonts are found through matplotlib's font list (installed system fonts plus the DejaVu Sans that matplotlib ships,
which covers Latin with accents, Greek and Cyrillic). CJK names need a CJK font installed, e.g. Debian's
``fonts-noto-cjk``; without one the label is drawn with boxes and a warning says what to install."""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

from fontTools.ttLib import TTFont
from PIL import ImageDraw, ImageFont

log = logging.getLogger(__name__)

PREFERRED = (
    "DejaVu Sans",
    "Noto Sans",
    "Noto Sans CJK JP",
    "Noto Sans CJK SC",
    "Noto Sans CJK KR",
    "Source Han Sans",
    "WenQuanYi Zen Hei",
    "WenQuanYi Micro Hei",
    "Droid Sans Fallback",
    "Noto Sans Arabic",
    "Noto Sans Hebrew",
    "Noto Sans Devanagari",
    "Noto Sans Thai",
)
FALLBACK_HINT = "install a font with wide coverage, e.g. Debian's fonts-noto-cjk and fonts-noto-core"


@dataclass(frozen=True)
class FontFile:
    family: str
    path: str


@functools.cache
def installed_fonts() -> tuple[FontFile, ...]:
    """Regular-weight upright fonts matplotlib knows, ``PREFERRED`` families first (in that order), one file each."""
    from matplotlib import font_manager  # imported on first use: `inspect` and `verify` draw nothing

    by_family: dict[str, str] = {}
    for entry in font_manager.fontManager.ttflist:
        if entry.style == "normal" and entry.weight in (400, "normal", "regular") and entry.name not in by_family:
            by_family[entry.name] = entry.fname
    preferred = [FontFile(name, by_family.pop(name)) for name in PREFERRED if name in by_family]
    return (*preferred, *(FontFile(name, path) for name, path in sorted(by_family.items())))


@functools.cache
def _codepoints(path: str) -> frozenset[int]:
    """Characters the font (the first face of a collection) has glyphs for."""
    try:
        with TTFont(path, fontNumber=0, lazy=True) as font:
            return frozenset(font.getBestCmap() or {})
    except Exception:  # noqa: BLE001 - an unreadable font file is simply not used
        return frozenset()


def font_for(char: str) -> FontFile | None:
    """The first installed font with a glyph for ``char``; None when no installed font has one."""
    for font in installed_fonts():
        if ord(char) in _codepoints(font.path):
            return font
    return None


def runs(text: str) -> list[tuple[str, FontFile]]:
    """``text`` cut into runs of characters drawn with the same font (whitespace joins the run before it)."""
    default = installed_fonts()[0]
    out: list[tuple[str, FontFile]] = []
    missing = set()
    for char in text:
        font = out[-1][1] if out and char.isspace() else font_for(char)
        if font is None:
            missing.add(char)
            font = default
        if out and out[-1][1] == font:
            out[-1] = (out[-1][0] + char, font)
        else:
            out.append((char, font))
    if missing:
        log.warning("no installed font has glyphs for %s in %r; %s", "".join(sorted(missing)), text, FALLBACK_HINT)
    return out


@functools.cache
def _pil_font(path: str, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(path, size)


def draw_label(draw: ImageDraw.ImageDraw, xy: tuple[int, int], text: str, size: int,
               fill: tuple[int, int, int] = (255, 255, 255)) -> None:
    """Draw ``text`` at ``xy``, run by run."""
    x, y = xy
    for part, font in runs(text):
        pil = _pil_font(font.path, size)
        draw.text((x, y), part, fill=fill, font=pil)
        x += pil.getlength(part)


def label_size(text: str, size: int) -> tuple[int, int]:
    """Width and height that ``draw_label`` covers for ``text``."""
    width, height = 0.0, 0
    for part, font in runs(text):
        pil = _pil_font(font.path, size)
        box = pil.getbbox(part)
        width += pil.getlength(part)
        height = max(height, box[3])
    return round(width), height


def matplotlib_families() -> list[str]:
    """A font.family list for matplotlib (which falls back glyph by glyph along it, since 3.6)."""
    return [font.family for font in installed_fonts()[: len(PREFERRED)] if font.family in PREFERRED]
