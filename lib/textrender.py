"""Text -> image: a Pillow/FreeType renderer with a per-word bitmap and width cache, and a denoiser.

Both are built once per worker process (font loaded, caches empty) and then reused for every sample; building
them per sample is the slow pattern bench/build_cache_speed.py measures against.

Rendering (`Renderer.render`): words are separated by single spaces (runs of whitespace collapse), laid out
left to right and wrapped greedily at `width - 2 * margin_x`; a word wider than a whole line is split between
characters. Each distinct word is rasterized once by FreeType (`getmask2`, basic layout so raqm's presence
does not change the pixels) and kept with its advance width; a page is the word masks pasted through the
text colour onto the background. Lines that do not fit the height are dropped and counted (`overflow`).
The output depends only on the text and the settings, never on what the caches held (same bytes always).

Denoising (`Denoiser`): `none`; `median` (3x3 median: removes isolated specks and salt-and-pepper noise,
erodes strokes thinner than 2 px, so use it with fonts of about 20 px and up); `smooth` (fixed 3x3 binomial
kernel [1 2 1]^T [1 2 1] / 16: softens pixel noise, blurs slightly); `despeckle` (an ink pixel whose 8
neighbours are all background becomes background: removes stray dots, never touches a stroke). All integer
arithmetic on uint8 (C, H, W) arrays, exact and deterministic; rows more than 1 px away from any ink are
background in and out, so only the rows around ink are filtered.
"""
import os
import sys
from dataclasses import dataclass, field
from importlib.util import find_spec
from pathlib import Path

import numpy as np
from PIL import Image, ImageFont, features

from lib.config import ConfigError

DEFAULT_FONT = "DejaVuSans.ttf"
FONT_DIRS = ("/usr/share/fonts", "/usr/local/share/fonts", "~/.local/share/fonts", "~/.fonts",
             "/Library/Fonts", "/System/Library/Fonts", "C:/Windows/Fonts")
MODES = {"L": 1, "RGB": 3}          # image mode -> channels
WRAPS = ("word", "char")
DENOISERS = ("none", "median", "smooth", "despeckle")


class FontNotFoundError(FileNotFoundError):
    """The configured font file does not exist; the message lists where it was looked for."""


@dataclass
class RenderConfig:
    width: int = 224                # px
    height: int = 224               # px
    mode: str = "L"                 # L (grayscale, 1 channel) | RGB (3 channels)
    font: str = "auto"              # auto: DejaVuSans.ttf if installed (system font folders or matplotlib's),
                                    # else Pillow's built-in font, with a note | builtin | a .ttf/.otf path or name
    font_size: int = 14             # px (em size)
    margin_x: int = 8               # px, left and right
    margin_y: int = 8               # px, top and bottom
    line_spacing: float = 1.15      # line pitch in multiples of the font's line height (ascent + descent)
    wrap: str = "word"              # word: break between words (over-long words between characters) |
                                    # char: break between any characters (text without spaces; no kerning)
    foreground: list[int] = field(default_factory=lambda: [0])      # text colour, 0-255: 1 value (gray) or 3 (RGB)
    background: list[int] = field(default_factory=lambda: [255])    # page colour, same format
    word_cache_size: int = 50000    # distinct words kept per renderer (bitmap + width, ~1 KB each); oldest dropped

    def validate(self):
        if self.mode not in MODES:
            raise ConfigError(f"render.mode must be one of {', '.join(MODES)}, got '{self.mode}'")
        if self.wrap not in WRAPS:
            raise ConfigError(f"render.wrap must be one of {', '.join(WRAPS)}, got '{self.wrap}'")
        if self.width < 8 or self.height < 8 or self.font_size < 4:
            raise ConfigError(f"render.width/height must be >= 8 px and render.font_size >= 4 px, got "
                             f"{self.width}x{self.height}, {self.font_size}")
        if not (0 <= 2 * self.margin_x < self.width and 0 <= 2 * self.margin_y < self.height):
            raise ConfigError(f"render margins ({self.margin_x}, {self.margin_y}) leave no room in a "
                             f"{self.width}x{self.height} image")
        if self.line_spacing <= 0 or self.word_cache_size < 1:
            raise ConfigError("render.line_spacing must be > 0 and render.word_cache_size >= 1")
        for name in ("foreground", "background"):
            value = getattr(self, name)
            if len(value) not in (1, 3) or not all(0 <= v <= 255 for v in value):
                raise ConfigError(f"render.{name} must be 1 (gray) or 3 (RGB) values in 0-255, got {value}")


@dataclass
class DenoiseConfig:
    method: str = "despeckle"       # none | median | smooth | despeckle (see the module docstring)

    def validate(self):
        if self.method not in DENOISERS:
            raise ConfigError(f"denoise.method must be one of {', '.join(DENOISERS)}, got '{self.method}'")


# ----------------------------------------------------------------------------- fonts
def _matplotlib_fonts():
    spec = find_spec("matplotlib")  # located, not imported
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "mpl-data" / "fonts" / "ttf"


def _search_font(name: str):
    for folder in FONT_DIRS:
        folder = Path(folder).expanduser()
        if folder.is_dir():
            found = sorted(folder.rglob(name))
            if found:
                return found[0]
    mpl = _matplotlib_fonts()
    if mpl is not None and (mpl / name).is_file():
        return mpl / name
    return None


def resolve_font(font: str):
    """Map render.font to an absolute font file path or 'builtin'; returns (font, note or None)."""
    if font == "builtin":
        return "builtin", None
    if font == "auto":
        found = _search_font(DEFAULT_FONT)
        if found is None:
            return "builtin", (f"{DEFAULT_FONT} not found in {', '.join(FONT_DIRS)} or matplotlib's fonts: "
                               f"rendering with Pillow's built-in font (install fonts-dejavu-core or set "
                               f"render.font to a .ttf file for DejaVu Sans)")
        return str(found.resolve()), None
    path = Path(font).expanduser()
    if path.is_file():
        return str(path.resolve()), None
    if path.name == font:  # a bare file name: look in the font folders
        found = _search_font(font)
        if found is not None:
            return str(found.resolve()), None
    raise FontNotFoundError(f"font '{font}' not found (as a path, or by name in {', '.join(FONT_DIRS)} and "
                            f"matplotlib's fonts); give the path of a .ttf/.otf file, or render.font=auto|builtin")


def load_font(font: str, size: int):
    """A FreeType font object for a resolved font ('builtin' or a file path), basic layout."""
    if not features.check("freetype2"):
        raise RuntimeError("this Pillow was built without FreeType; install the pillow wheel from PyPI")
    if font == "builtin":
        return ImageFont.load_default(size)
    try:
        return ImageFont.truetype(font, size, layout_engine=ImageFont.Layout.BASIC)
    except OSError as e:
        raise FontNotFoundError(f"cannot load font {font} ({e}); it is missing or not a TrueType/OpenType "
                                f"file") from None


def renderer_versions() -> dict:
    """The library versions that decide the rendered pixels (stored with a cache, checked on reuse)."""
    return {"pillow": Image.__version__, "freetype": features.version("freetype2") or "none"}


def _colour(value, mode):
    if mode == "RGB":
        return tuple(value) * 3 if len(value) == 1 else tuple(value)
    if len(value) == 1:
        return value[0]
    r, g, b = value
    return (r * 299 + g * 587 + b * 114) // 1000  # ITU-R 601 luma, as PIL's RGB -> L conversion


# ----------------------------------------------------------------------------- renderer
class Renderer:
    """Lays out and rasterizes text into a (C, H, W) uint8 array; caches each word's bitmap and width."""

    def __init__(self, cfg: RenderConfig, font: str | None = None):
        cfg.validate()
        self.cfg = cfg
        self.font_spec = font if font is not None else resolve_font(cfg.font)[0]
        self.font = load_font(self.font_spec, cfg.font_size)
        ascent, descent = self.font.getmetrics()
        self.line_height = ascent + descent                             # px of one line's glyph box
        self.line_pitch = max(1, round(cfg.line_spacing * self.line_height))  # px from one line top to the next
        self.space = self.font.getlength(" ") if cfg.wrap == "word" else 0.0
        self.ink = _colour(cfg.foreground, cfg.mode)
        self.paper = _colour(cfg.background, cfg.mode)
        self.words = {}                                                 # word -> (mask Image | None, offset, advance)
        self.hits = self.misses = 0

    def _word(self, word):
        entry = self.words.get(word)
        if entry is not None:
            self.hits += 1
            return entry
        self.misses += 1
        mask, offset = self.font.getmask2(word, mode="L")
        # getmask2 gives Pillow's internal image core; wrapping it is what ImageDraw.text does internally
        image = Image.Image()._new(mask) if mask.size[0] and mask.size[1] else None
        entry = (image, offset, self.font.getlength(word))
        if len(self.words) >= self.cfg.word_cache_size:
            del self.words[next(iter(self.words))]                      # drop the oldest entry
        self.words[word] = entry
        return entry

    def _split(self, word, line_width):
        """Pieces of a word wider than a line, each as wide as fits (at least one character)."""
        pieces, start = [], 0
        while start < len(word):
            end = start + 1
            while end < len(word) and self.font.getlength(word[start:end + 1]) <= line_width:
                end += 1
            pieces.append(word[start:end])
            start = end
        return pieces

    def _tokens(self, text):
        if self.cfg.wrap == "char":
            return list(text)
        return text.split()

    def render(self, text: str):
        """(image uint8 (C, H, W), overflow) where overflow is True if some text did not fit the page."""
        cfg = self.cfg
        page = Image.new(cfg.mode, (cfg.width, cfg.height), self.paper)
        left, right = cfg.margin_x, cfg.width - cfg.margin_x
        line_width = right - left
        bottom = cfg.height - cfg.margin_y
        x, y = float(left), cfg.margin_y
        if y + self.line_height > bottom:
            return self._array(page), bool(text.strip())
        tokens = self._tokens(text)
        overflow = False
        i = 0
        while i < len(tokens):
            token = tokens[i]
            image, (dx, dy), advance = self._word(token)
            if advance > line_width and len(token) > 1:                # never fits a line: split it in place
                tokens[i:i + 1] = self._split(token, line_width)
                continue
            if x > left and x + advance > right:                        # next line
                x, y = float(left), y + self.line_pitch
                if y + self.line_height > bottom:
                    overflow = True
                    break
                if cfg.wrap == "char" and token == " ":                 # no leading space on a wrapped line
                    i += 1
                    continue
            if image is not None:
                page.paste(self.ink, (int(x) + dx, y + dy), image)
            x += advance + self.space
            i += 1
        return self._array(page), overflow

    def _array(self, page):
        a = np.asarray(page)                                            # (H, W) or (H, W, 3)
        if a.ndim == 2:
            return a[None]                                              # (1, H, W)
        return np.ascontiguousarray(a.transpose(2, 0, 1))               # (3, H, W)


# ----------------------------------------------------------------------------- denoiser
# Devillard's 19-exchange network: after it, slot 4 holds the median of 9 values
_MEDIAN9 = ((1, 2), (4, 5), (7, 8), (0, 1), (3, 4), (6, 7), (1, 2), (4, 5), (7, 8), (0, 3), (5, 8), (4, 7),
            (3, 6), (1, 4), (2, 5), (4, 7), (4, 2), (6, 4), (4, 2))


class Denoiser:
    """A fixed cleanup filter on uint8 (C, H, W) images; see the module docstring for the methods."""

    def __init__(self, cfg: DenoiseConfig, render: RenderConfig):
        cfg.validate()
        self.method = cfg.method
        channels = MODES[render.mode]
        paper = _colour(render.background, render.mode)
        self.paper = np.array(paper if channels == 3 else [paper], dtype=np.uint8).reshape(channels, 1, 1)
        self.filter = {"none": None, "median": self._median, "smooth": self._smooth,
                       "despeckle": self._despeckle}[cfg.method]
        # scratch buffers for the padded image, reused for every sample of this size
        self.padded = np.empty((channels, render.height + 2, render.width + 2), dtype=np.uint8)
        self.acc = np.empty((channels, render.height + 2, render.width), dtype=np.uint16)

    def __call__(self, image):
        if self.filter is None:
            return image
        ink_rows = np.flatnonzero((image != self.paper).any(axis=(0, 2)))
        if ink_rows.size == 0:
            return image
        lo, hi = max(int(ink_rows[0]) - 1, 0), min(int(ink_rows[-1]) + 2, image.shape[1])
        out = image.copy()
        out[:, lo:hi] = self.filter(image, lo, hi)
        return out

    def _pad(self, image, lo, hi):
        """Rows lo-1 .. hi of `image` with edge replication, columns padded by 1: (C, hi - lo + 2, W + 2)."""
        rows = hi - lo
        p = self.padded[:, :rows + 2]
        p[:, 1:-1, 1:-1] = image[:, lo:hi]
        p[:, 0, 1:-1] = image[:, max(lo - 1, 0)]
        p[:, -1, 1:-1] = image[:, min(hi, image.shape[1] - 1)]
        p[:, :, 0] = p[:, :, 1]
        p[:, :, -1] = p[:, :, -2]
        return p

    def _median(self, image, lo, hi):
        p = self._pad(image, lo, hi)
        rows, cols = hi - lo, image.shape[2]
        v = [p[:, i:i + rows, j:j + cols] for i in range(3) for j in range(3)]
        for a, b in _MEDIAN9:
            v[a], v[b] = np.minimum(v[a], v[b]), np.maximum(v[a], v[b])
        return v[4]

    def _smooth(self, image, lo, hi):
        p = self._pad(image, lo, hi)
        rows = hi - lo
        h = self.acc[:, :rows + 2]                                      # horizontal [1 2 1], uint16
        np.add(p[:, :, :-2], p[:, :, 2:], out=h, dtype=np.uint16)
        h += p[:, :, 1:-1]
        h += p[:, :, 1:-1]
        v = h[:, :-2] + h[:, 2:] + 2 * h[:, 1:-1] + 8                   # vertical [1 2 1], rounded
        return (v >> 4).astype(np.uint8)

    def _despeckle(self, image, lo, hi):
        p = self._pad(image, lo, hi)
        ink = p[0] != self.paper[0] if len(p) == 1 else (p != self.paper).any(axis=0)
        ink = ink.view(np.uint8)                                          # (rows + 2, W + 2), 0/1
        across = ink[:, :-2] + ink[:, 1:-1] + ink[:, 2:]                  # 3-wide sums
        box = across[:-2] + across[1:-1] + across[2:]                     # 3x3 sums, centre included
        speck = ink[1:-1, 1:-1].astype(bool) & (box == 1)                 # ink with no ink around it
        out = image[:, lo:hi].copy()
        out[:, speck] = self.paper[:, 0]                                  # (C, 1) over the specks
        return out


def build(render: RenderConfig, denoise: DenoiseConfig, font: str | None = None):
    """One renderer and one denoiser (what each worker process builds once)."""
    return Renderer(render, font), Denoiser(denoise, render)


def log(message: str):
    """A note for the user on stderr (the stdout of benches is JSON lines)."""
    print(message, file=sys.stderr, flush=True)


def usable_cores() -> int:
    """CPU cores this process may run on (affinity-aware where the OS tells)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1
