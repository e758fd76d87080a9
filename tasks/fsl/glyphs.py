"""The embedded ``glyphs`` few-shot dataset: characters rendered from the fonts matplotlib ships.

Each class is one Unicode character; its images are renderings in the fonts that cover it (DejaVu
Sans/Serif/Mono, STIX, Computer Modern, every style) under random affine jitter, elastic stroke
wobble, stroke-width changes, broken strokes and pixel noise, at 28x28 grayscale with white ink on
black (Omniglot's convention after learn2learn's ``1 - x``). Classes are split into meta-train,
meta-val and meta-test **by script**, like Omniglot's background/evaluation alphabets, so test-time
characters come from writing systems never seen in training:

========== =============================================================================
split      scripts
========== =============================================================================
train      Latin (letters, digits), Greek, Cyrillic, Unified Canadian Syllabics
val        Armenian, Hebrew
test       Georgian, Lao, Tifinagh, N'Ko, Ogham
========== =============================================================================

Only letters and digits are used (Unicode categories L* and Nd). Characters whose clean rendering
is nearly identical to a character already kept (Latin ``O`` and digit ``0``, Greek omicron and
Cyrillic O; ``o`` and ``O`` once sizes are normalised, ...) are dropped, in the order of the
table, so no two classes — within or across splits — are homoglyphs.

The set is a pure function of ``(seed, images_per_class)``, the generator version and the
installed fonts; it is cached as ``.npz`` under a directory keyed by all of them.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import tempfile
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
import torch
import torch.nn.functional as F
from matplotlib import ft2font

from tasks.common.validate import check_int

__all__ = ["GLYPH_SCRIPTS", "GlyphSet", "Script", "generate_glyphs", "load_glyphs"]

log = logging.getLogger(__name__)

GENERATOR_VERSION = 1
IMAGE_SIZE = 28
_CANVAS = 2 * IMAGE_SIZE  # rendered and augmented at 2x, then area-downsampled
_BOX = 40  # the clean glyph's longer side on the canvas
_LETTER_CATEGORIES = ("Lu", "Ll", "Lt", "Lo", "Nd")
_HOMOGLYPH_COSINE = 0.93  # clean renderings more similar than this are the same class
_CHUNK = 1024
_NO_HINTING = ft2font.LoadFlags.NO_HINTING if hasattr(ft2font, "LoadFlags") else ft2font.LOAD_NO_HINTING


@dataclass(frozen=True)
class Script:
    """A writing system: its name, the meta-split it belongs to and its code-point ranges."""

    name: str
    split: str
    ranges: tuple[tuple[int, int], ...]


GLYPH_SCRIPTS: tuple[Script, ...] = (
    Script("latin", "train", ((0x30, 0x39), (0x41, 0x5A), (0x61, 0x7A))),
    Script("greek", "train", ((0x391, 0x3A9), (0x3B1, 0x3C9))),
    Script("cyrillic", "train", ((0x400, 0x4FF),)),
    Script("canadian-syllabics", "train", ((0x1401, 0x166C),)),
    Script("armenian", "val", ((0x531, 0x556), (0x561, 0x587))),
    Script("hebrew", "val", ((0x5D0, 0x5EA),)),
    Script("georgian", "test", ((0x10A0, 0x10FF),)),
    Script("lao", "test", ((0xE80, 0xEFF),)),
    Script("tifinagh", "test", ((0x2D30, 0x2D7F),)),
    Script("nko", "test", ((0x7C0, 0x7FF),)),
    Script("ogham", "test", ((0x1681, 0x169A),)),
)
"""The scripts, in priority order for homoglyph removal."""

# Fonts with a Unicode cmap for real text; Computer Modern maps ASCII only (cmsy/cmex are symbols).
_FONT_FILES = (
    "DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSans-BoldOblique.ttf",
    "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf", "DejaVuSansMono-Oblique.ttf",
    "DejaVuSansMono-BoldOblique.ttf", "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSerif-Italic.ttf",
    "DejaVuSerif-BoldItalic.ttf", "STIXGeneral.ttf", "STIXGeneralBol.ttf", "STIXGeneralItalic.ttf",
    "STIXGeneralBolIta.ttf",
)
_ASCII_FONT_FILES = ("cmr10.ttf", "cmb10.ttf", "cmss10.ttf", "cmti10.ttf", "cmtt10.ttf", "cmmi10.ttf")


@dataclass
class GlyphSet:
    """A generated glyph dataset.

    Attributes:
        images: ``(N, 28, 28)`` uint8, ink 255 on background 0.
        labels: ``(N,)`` int64 class index of every image.
        class_names: ``"<script>:<char> U+XXXX"`` per class.
        class_splits: ``"train"``, ``"val"`` or ``"test"`` per class.
    """

    images: np.ndarray
    labels: np.ndarray
    class_names: list[str]
    class_splits: list[str]

    def split_classes(self, split: str) -> list[int]:
        """The class indices of ``split`` (``"train"``, ``"val"`` or ``"test"``)."""
        if split not in ("train", "val", "test"):
            raise ValueError(f"GlyphSet: split must be 'train', 'val' or 'test', got {split!r}")
        return [c for c, s in enumerate(self.class_splits) if s == split]


def _font_dir() -> Path:
    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


def _render(font: ft2font.FT2Font, char: str) -> np.ndarray | None:
    """The antialiased bitmap of ``char`` cropped to its ink, or ``None`` if it has no ink."""
    font.set_size(64, 72)
    font.set_text(char, 0.0, flags=_NO_HINTING)
    font.draw_glyphs_to_bitmap(antialiased=True)
    bitmap = np.asarray(font.get_image())
    rows, cols = np.nonzero(bitmap > 32)
    if rows.size == 0:
        return None
    return bitmap[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]


def _fit(bitmap: np.ndarray, box: int, canvas: int) -> torch.Tensor:
    """``bitmap`` scaled so its longer side is ``box`` pixels, centred on a ``canvas`` square, in [0, 1]."""
    h, w = bitmap.shape
    scale = box / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    glyph = torch.from_numpy(bitmap.astype(np.float32) / 255.0)[None, None]
    glyph = F.interpolate(glyph, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)[0, 0]
    out = torch.zeros(canvas, canvas)
    top, left = (canvas - nh) // 2, (canvas - nw) // 2
    out[top : top + nh, left : left + nw] = glyph
    return out


def _candidates(scripts: Sequence[Script]) -> list[tuple[Script, str, list[ft2font.FT2Font]]]:
    """Every (script, character, fonts covering it) eligible as a class, in table order."""
    font_dir = _font_dir()
    fonts = [(ft2font.FT2Font(str(font_dir / f)), False) for f in _FONT_FILES]
    fonts += [(ft2font.FT2Font(str(font_dir / f)), True) for f in _ASCII_FONT_FILES]
    charmaps = [(font, set(font.get_charmap()), ascii_only) for font, ascii_only in fonts]
    result = []
    for script in scripts:
        for lo, hi in script.ranges:
            for cp in range(lo, hi + 1):
                if unicodedata.category(chr(cp)) not in _LETTER_CATEGORIES:
                    continue
                covering = [f for f, cmap, ascii_only in charmaps
                            if cp in cmap and (cp < 128 or not ascii_only)]
                if covering:
                    result.append((script, chr(cp), covering))
    return result


def _select_classes(scripts: Sequence[Script]) -> list[tuple[Script, str, list[np.ndarray]]]:
    """Distinct classes with the cropped bitmap of each covering font (homoglyphs removed)."""
    kept: list[tuple[Script, str, list[np.ndarray]]] = []
    kept_vectors: list[torch.Tensor] = []
    for script, char, fonts in _candidates(scripts):
        bitmaps = [b for b in (_render(f, char) for f in fonts) if b is not None]
        if not bitmaps:
            continue
        vector = _fit(bitmaps[0], IMAGE_SIZE - 6, IMAGE_SIZE).flatten()
        vector = vector / vector.norm()
        if kept_vectors and float((torch.stack(kept_vectors) @ vector).max()) > _HOMOGLYPH_COSINE:
            continue
        kept.append((script, char, bitmaps))
        kept_vectors.append(vector)
    return kept


def _augment(clean: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random affine + elastic jitter, stroke width, broken strokes and noise; (B, 56, 56) -> (B, 28, 28)."""
    b = clean.shape[0]

    def uniform(lo: float, hi: float, *shape: int) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(*(shape or (b,)), generator=gen)

    angle = uniform(-15.0, 15.0) * math.pi / 180
    shear = uniform(-0.2, 0.2)
    scale = uniform(0.85, 1.12)
    aspect = uniform(0.9, 1.1)
    shift = uniform(-2.0, 2.0, b, 2) / (IMAGE_SIZE / 2)
    cos, sin = torch.cos(angle), torch.sin(angle)
    # inverse map (output -> input coordinates) for affine_grid: R(angle) @ Shear @ diag(sx, sy)
    sx, sy = 1 / (scale * aspect), aspect / scale
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = cos * sx
    theta[:, 0, 1] = (cos * shear - sin) * sy
    theta[:, 1, 0] = sin * sx
    theta[:, 1, 1] = (sin * shear + cos) * sy
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta, [b, 1, _CANVAS, _CANVAS], align_corners=False)
    wobble = torch.randn(b, 2, 4, 4, generator=gen) * 0.035
    grid = grid + F.interpolate(wobble, size=(_CANVAS, _CANVAS), mode="bilinear", align_corners=True).permute(
        0, 2, 3, 1
    )
    x = F.grid_sample(clean[:, None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    # stroke width: a third of the images get one canvas pixel (half an output pixel) bolder
    bolder = (torch.rand(b, generator=gen) < 1 / 3).nonzero()[:, 0]
    x[bolder] = F.max_pool2d(x[bolder], 3, stride=1, padding=1)

    # broken strokes: smooth random field, ink removed where it peaks (~4 % of the canvas)
    field = F.interpolate(torch.randn(b, 1, 7, 7, generator=gen), size=(_CANVAS, _CANVAS), mode="bilinear",
                          align_corners=True)
    x = x * (field < 1.75).float()

    x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="area")[:, 0]
    x = x + 0.04 * torch.randn(x.shape, generator=gen)
    return x.clamp_(0.0, 1.0)


def generate_glyphs(
    seed: int = 0, images_per_class: int = 20, scripts: Sequence[Script] = GLYPH_SCRIPTS
) -> GlyphSet:
    """Render the glyph dataset (deterministic in ``seed``; 10-20 s on two CPU cores).

    Args:
        seed: seeds the choice of font per image and every random augmentation.
        images_per_class: images of every class (cycling through the fonts covering it).
        scripts: the scripts, their splits and code points, in homoglyph-priority order.

    Raises:
        ValueError: for ``images_per_class < 1``.
    """
    check_int("images_per_class", images_per_class, owner="generate_glyphs")
    gen = torch.Generator().manual_seed(seed)
    classes = _select_classes(scripts)
    fitted: list[torch.Tensor] = []  # one clean canvas per (class, font)
    source: list[int] = []  # the canvas each image starts from
    for _, _, bitmaps in classes:
        order = (len(fitted) + torch.randperm(len(bitmaps), generator=gen)).tolist()
        source += [order[i % len(order)] for i in range(images_per_class)]
        fitted += [_fit(b, _BOX, _CANVAS) for b in bitmaps]
    canvases, source_index = torch.stack(fitted), torch.tensor(source)
    images = torch.cat([_augment(canvases[source_index[i : i + _CHUNK]], gen)
                        for i in range(0, len(source), _CHUNK)])
    return GlyphSet(
        images=(images * 255).round().to(torch.uint8).numpy(),
        labels=np.repeat(np.arange(len(classes), dtype=np.int64), images_per_class),
        class_names=[f"{s.name}:{c} U+{ord(c):04X}" for s, c, _ in classes],
        class_splits=[s.split for s, _, _ in classes],
    )


def _cache_key(seed: int, images_per_class: int, scripts: Sequence[Script]) -> str:
    fonts = "|".join(f"{f}:{(_font_dir() / f).stat().st_size}" for f in _FONT_FILES + _ASCII_FONT_FILES)
    text = (f"v{GENERATOR_VERSION}|seed={seed}|k={images_per_class}|{scripts!r}|torch={torch.__version__}|"
            f"mpl={matplotlib.__version__}|{fonts}")
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def load_glyphs(
    root: str | os.PathLike[str],
    seed: int = 0,
    images_per_class: int = 20,
    scripts: Sequence[Script] = GLYPH_SCRIPTS,
) -> GlyphSet:
    """The glyph dataset from the cache under ``root``, generating and caching it when missing.

    The cache file ``glyphs-v<version>-<key>.npz`` is keyed by the generator version, the
    parameters, the torch and matplotlib versions and the font files; it is written atomically,
    so concurrent runs never read a partial file.
    """
    root = Path(root).expanduser()
    path = root / f"glyphs-v{GENERATOR_VERSION}-{_cache_key(seed, images_per_class, scripts)}.npz"
    if path.is_file():
        with np.load(path) as data:
            return GlyphSet(
                images=data["images"],
                labels=data["labels"],
                class_names=data["class_names"].tolist(),
                class_splits=data["class_splits"].tolist(),
            )
    log.info("generating glyphs (seed=%d, %d images per class) into %s", seed, images_per_class, path)
    glyphs = generate_glyphs(seed, images_per_class, scripts)
    root.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=root, suffix=".npz.tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez_compressed(
                fh,
                images=glyphs.images,
                labels=glyphs.labels,
                class_names=np.array(glyphs.class_names),
                class_splits=np.array(glyphs.class_splits),
            )
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the cache is meant to be shared
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return glyphs
