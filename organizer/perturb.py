"""Degraded copies of a labelled set, to see how detection and clustering hold up (`organizer
evaluate --perturb`): Gaussian noise, blur, low light and heavy JPEG compression, each at a few
levels. Copies are upright RGB JPEGs under the same ``<person>/<photo>`` names; originals are only read.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from .ingest import IngestError, is_candidate, open_upright

KINDS = ("noise", "blur", "dark", "jpeg")
# noise: sigma on the 0-255 scale; blur: Gaussian radius as a share of the longer side;
# dark: brightness factor (low light, as an underexposed photo); jpeg: quality.
LEVELS: dict[str, tuple[float, ...]] = {
    "noise": (10, 25, 50),
    "blur": (0.005, 0.01),
    "dark": (0.3, 0.12),
    "jpeg": (15, 5),
}
CLEAN_QUALITY = 95  # copies of the other kinds are saved with little loss of their own


@dataclass(frozen=True)
class Perturbation:
    kind: str
    level: float

    @property
    def label(self) -> str:
        return f"{self.kind} {self.level:g}"


def perturbations(kinds: list[str]) -> list[Perturbation]:
    for kind in kinds:
        if kind not in LEVELS:
            raise ValueError(f"unknown perturbation {kind!r}; choose from {', '.join(KINDS)}")
    return [Perturbation(k, lv) for k in kinds for lv in LEVELS[k]]


def degrade(im: Image.Image, p: Perturbation, seed: int = 0) -> tuple[Image.Image, int]:
    """(degraded image, JPEG quality to save it with)."""
    if p.kind == "noise":
        rng = np.random.default_rng(seed)
        a = np.asarray(im, dtype=np.float32) + rng.normal(0, p.level, (im.height, im.width, 3)).astype(np.float32)
        return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), "RGB"), CLEAN_QUALITY
    if p.kind == "blur":
        return im.filter(ImageFilter.GaussianBlur(max(im.size) * p.level)), CLEAN_QUALITY
    if p.kind == "dark":
        a = np.asarray(im, dtype=np.float32) * p.level
        return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), "RGB"), CLEAN_QUALITY
    return im, int(p.level)


def degraded_copy(src: Path, dst: Path, p: Perturbation, max_pixels: int = 100_000_000) -> int:
    """Write degraded copies of every photo under ``src/<person>/`` to ``dst``; returns how many.
    A photo that cannot be read is left out (it would fail in the clean run as well)."""
    n = 0
    for i, path in enumerate(sorted(q for q in Path(src).glob("*/**/*") if q.is_file() and is_candidate(q))):
        try:
            im = open_upright(path, max_pixels)
        except (IngestError, OSError):
            continue
        out, quality = degrade(im, p, seed=i)
        target = dst / path.relative_to(src).with_suffix(".jpg")
        if target.exists():  # a.png and a.jpg side by side
            target = target.with_name(f"{path.stem}_{path.suffix.lstrip('.')}.jpg")
        target.parent.mkdir(parents=True, exist_ok=True)
        out.save(target, "JPEG", quality=quality)
        n += 1
    return n
