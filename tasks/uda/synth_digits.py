"""The embedded ``synth`` source domain: digits 0-9 rendered from the fonts matplotlib ships.

A SynDigits-like domain (Ganin & Lempitsky 2015 rendered digits to adapt to SVHN) built with no
download: each image is one digit in one of the DejaVu, STIX or Computer Modern fonts matplotlib
ships, under random affine jitter (rotation, scale, shear, shift), stroke width, a random
foreground and background colour (light on dark or dark on light, with a minimum contrast),
clutter (parts of neighbouring digits at the sides, as in house-number crops, random strokes and
pixel noise) and Gaussian blur, rendered at 2x and area-downsampled to ``IMAGE_SIZE`` pixels, RGB.
Its target is scikit-learn's grey, blocky 8x8 handwritten digits: a real domain gap (print vs
handwriting, colour vs grey, clutter vs clean) with the same ten classes.

The set is a pure function of ``(seed, images_per_class)``, the generator version and the
installed fonts; it is cached as ``.npz`` under ``<data_dir>/uda/`` keyed by all of them.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import tempfile
from pathlib import Path

import matplotlib
import numpy as np
import torch
import torch.nn.functional as F
from matplotlib import ft2font

from tasks.common.validate import check_int

__all__ = ["FONT_FILES", "IMAGE_SIZE", "generate_synth_digits", "load_synth_digits"]

log = logging.getLogger(__name__)

GENERATOR_VERSION = 1
IMAGE_SIZE = 16
_CANVAS = 2 * IMAGE_SIZE  # rendered and augmented at 2x, then area-downsampled
_BOX = 24  # the clean digit's height on the canvas
_CHUNK = 1024
_MIN_CONTRAST = 0.45  # |luminance(foreground) - luminance(background)|
_LUMA = torch.tensor([0.299, 0.587, 0.114])
_NO_HINTING = ft2font.LoadFlags.NO_HINTING if hasattr(ft2font, "LoadFlags") else ft2font.LOAD_NO_HINTING

FONT_FILES: tuple[str, ...] = (
    "DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSans-BoldOblique.ttf",
    "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf", "DejaVuSansMono-Oblique.ttf",
    "DejaVuSansMono-BoldOblique.ttf", "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSerif-Italic.ttf",
    "DejaVuSerif-BoldItalic.ttf", "STIXGeneral.ttf", "STIXGeneralBol.ttf", "STIXGeneralItalic.ttf",
    "STIXGeneralBolIta.ttf", "cmr10.ttf", "cmb10.ttf", "cmss10.ttf", "cmti10.ttf", "cmtt10.ttf",
)  # fmt: skip
"""The font files (in matplotlib's ``fonts/ttf``) the digits are rendered in."""


def _font_dir() -> Path:
    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


def _digit_canvases() -> torch.Tensor:
    """Clean digits, ``(fonts, 10, canvas, canvas)`` in [0, 1]: each digit ``_BOX`` pixels high, centred."""
    out = torch.zeros(len(FONT_FILES), 10, _CANVAS, _CANVAS)
    for f, name in enumerate(FONT_FILES):
        font = ft2font.FT2Font(str(_font_dir() / name))
        for digit in range(10):
            font.set_size(64, 72)
            font.set_text(str(digit), 0.0, flags=_NO_HINTING)
            font.draw_glyphs_to_bitmap(antialiased=True)
            bitmap = np.asarray(font.get_image())
            rows, cols = np.nonzero(bitmap > 32)
            bitmap = bitmap[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
            h, w = bitmap.shape
            nh, nw = _BOX, max(1, min(_CANVAS, round(w * _BOX / h)))
            glyph = torch.from_numpy(bitmap.astype(np.float32) / 255.0)[None, None]
            glyph = F.interpolate(glyph, size=(nh, nw), mode="bilinear", antialias=True)[0, 0]
            top, left = (_CANVAS - nh) // 2, (_CANVAS - nw) // 2
            out[f, digit, top : top + nh, left : left + nw] = glyph.clamp(0.0, 1.0)
    return out


def _warp(ink: torch.Tensor, gen: torch.Generator, shift_x: torch.Tensor) -> torch.Tensor:
    """Random rotation, scale, shear and shift of ``ink`` ``(B, 1, S, S)``, plus ``shift_x`` sideways."""
    b = ink.shape[0]

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(b, generator=gen)

    angle = uniform(-12.0, 12.0) * math.pi / 180
    shear, scale, aspect = uniform(-0.2, 0.2), uniform(0.8, 1.1), uniform(0.85, 1.15)
    cos, sin = torch.cos(angle), torch.sin(angle)
    sx, sy = 1 / (scale * aspect), aspect / scale  # inverse map (output -> input) for affine_grid
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = cos * sx
    theta[:, 0, 1] = (cos * shear - sin) * sy
    theta[:, 1, 0] = sin * sx
    theta[:, 1, 1] = (sin * shear + cos) * sy
    theta[:, 0, 2] = uniform(-0.1, 0.1) + shift_x
    theta[:, 1, 2] = uniform(-0.1, 0.1)
    grid = F.affine_grid(theta, [b, 1, _CANVAS, _CANVAS], align_corners=False)
    return F.grid_sample(ink, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _colours(b: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Foreground and background RGB ``(B, 3)`` whose luminances differ by at least ``_MIN_CONTRAST``."""
    fg, bg = torch.rand(b, 3, generator=gen), torch.rand(b, 3, generator=gen)
    for _ in range(20):
        low = ((fg - bg) @ _LUMA).abs() < _MIN_CONTRAST
        if not low.any():
            break
        n = int(low.sum())
        fg[low], bg[low] = torch.rand(n, 3, generator=gen), torch.rand(n, 3, generator=gen)
    low = ((fg - bg) @ _LUMA).abs() < _MIN_CONTRAST  # rare leftovers: white on black
    fg[low], bg[low] = 1.0, 0.0
    return fg, bg


def _render(
    canvases: torch.Tensor, fonts: torch.Tensor, digits: torch.Tensor, gen: torch.Generator
) -> torch.Tensor:
    """One batch of images ``(B, 3, IMAGE_SIZE, IMAGE_SIZE)`` in [0, 1] of ``digits`` in ``fonts``."""
    b = digits.shape[0]
    ink = _warp(canvases[fonts, digits][:, None], gen, torch.zeros(b))
    thick = (torch.rand(b, generator=gen) < 0.4).nonzero()[:, 0]
    ink[thick] = F.max_pool2d(ink[thick], 3, stride=1, padding=1)
    # clutter: a neighbouring digit cut by the left or right border (a third of the images)
    neighbours = canvases[torch.randint(0, canvases.shape[0], (b,), generator=gen),
                          torch.randint(0, 10, (b,), generator=gen)][:, None]  # fmt: skip
    side = torch.where(torch.rand(b, generator=gen) < 0.5, -1.0, 1.0)
    shown = (torch.rand(b, generator=gen) < 1 / 3).float()[:, None, None, None]
    offset_x = side * (1.25 + 0.2 * torch.rand(b, generator=gen))
    ink = torch.maximum(ink, shown * _warp(neighbours, gen, offset_x))
    # clutter: a random straight stroke (a fifth of the images)
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, _CANVAS), torch.linspace(-1, 1, _CANVAS), indexing="ij")
    angle = math.pi * torch.rand(b, generator=gen)
    offset = 2 * torch.rand(b, generator=gen) - 1
    cos, sin = torch.cos(angle)[:, None, None], torch.sin(angle)[:, None, None]
    dist = xs * cos + ys * sin - offset[:, None, None]
    stroke = (dist.abs() < 0.04).float() * (torch.rand(b, generator=gen) < 0.2).float()[:, None, None]
    ink = torch.maximum(ink, 0.7 * stroke[:, None])
    fg, bg = _colours(b, gen)
    # background: a colour with a gentle linear gradient
    tilt = 0.15 * (torch.rand(b, 2, generator=gen) - 0.5)
    shade = tilt[:, 0, None, None] * xs + tilt[:, 1, None, None] * ys
    background = (bg[:, :, None, None] + shade[:, None]).clamp(0.0, 1.0)
    x = background * (1 - ink) + fg[:, :, None, None] * ink
    # blur (Gaussian, sigma 0-1 canvas pixel), downsample, pixel noise
    sigma = torch.rand(b, generator=gen)
    taps = torch.arange(-2, 3, dtype=torch.float32)
    kernel = torch.exp(-(taps[None] ** 2) / (2 * sigma[:, None].clamp_min(1e-3) ** 2))
    kernel = kernel / kernel.sum(1, keepdim=True)  # (B, 5)
    x = F.pad(x, (2, 2, 2, 2), mode="replicate")
    x = sum(kernel[:, i, None, None, None] * x[:, :, :, i : i + _CANVAS] for i in range(5))
    x = sum(kernel[:, i, None, None, None] * x[:, :, i : i + _CANVAS, :] for i in range(5))
    x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="area")
    x = x + 0.03 * torch.randn(x.shape, generator=gen)
    return x.clamp_(0.0, 1.0)


def generate_synth_digits(seed: int = 0, images_per_class: int = 600) -> tuple[np.ndarray, np.ndarray]:
    """Render the synthetic digits (deterministic in ``seed``).

    Args:
        seed: seeds the font of every image and every random transformation.
        images_per_class: images of each digit.

    Returns:
        ``(images, labels)``: ``(N, 3, IMAGE_SIZE, IMAGE_SIZE)`` uint8 and ``(N,)`` int64 digits,
        ``N = 10 * images_per_class``, classes interleaved in a random order.

    Raises:
        ValueError: for ``images_per_class < 1``.
    """
    check_int("images_per_class", images_per_class, owner="generate_synth_digits")
    gen = torch.Generator().manual_seed(seed)
    canvases = _digit_canvases()
    n = 10 * images_per_class
    digits = torch.arange(10).repeat(images_per_class)[torch.randperm(n, generator=gen)]
    fonts = torch.randint(0, len(FONT_FILES), (n,), generator=gen)
    images = torch.cat([_render(canvases, fonts[i : i + _CHUNK], digits[i : i + _CHUNK], gen)
                        for i in range(0, n, _CHUNK)])  # fmt: skip
    return (images * 255).round().to(torch.uint8).numpy(), digits.numpy()


def _cache_key(seed: int, images_per_class: int) -> str:
    fonts = "|".join(f"{f}:{(_font_dir() / f).stat().st_size}" for f in FONT_FILES)
    text = (f"v{GENERATOR_VERSION}|seed={seed}|k={images_per_class}|size={IMAGE_SIZE}|"
            f"torch={torch.__version__}|mpl={matplotlib.__version__}|{fonts}")
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def load_synth_digits(
    root: str | os.PathLike[str], seed: int = 0, images_per_class: int = 600
) -> tuple[np.ndarray, np.ndarray]:
    """The synthetic digits from the cache under ``root/uda``, rendering and caching them when missing.

    The file ``synth-digits-v<version>-<key>.npz`` is keyed by the generator version, the
    parameters, the torch and matplotlib versions and the font files, and written atomically
    (concurrent runs never read a partial file).
    """
    directory = Path(root).expanduser() / "uda"
    path = directory / f"synth-digits-v{GENERATOR_VERSION}-{_cache_key(seed, images_per_class)}.npz"
    if path.is_file():
        with np.load(path) as data:
            return data["images"], data["labels"]
    log.info("rendering synthetic digits (seed=%d, %d per class) into %s", seed, images_per_class, path)
    images, labels = generate_synth_digits(seed, images_per_class)
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, suffix=".npz.tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez_compressed(fh, images=images, labels=labels)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the cache is meant to be shared
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return images, labels
