"""Generate a small synthetic 10-class ImageFolder dataset for the offline FastMIM demo.

Layout: OUT/train/<class>/<i>.jpg and OUT/val/<class>/<i>.jpg (RGB JPEG, quality 90, size x size; ~5% of the train
images are greyscale "L" JPEGs to exercise greyscale->RGB conversion). Classes are defined by spatial STRUCTURE only:
every image draws random foreground/background colours, scale/frequency, phase, position, a small rotation jitter and
additive Gaussian noise, so mean colour is no shortcut. All classes are invariant to horizontal flips (45 vs 135 degree
gratings would be mirror images, so a single diagonal class takes either) and survive RandomResizedCrop(0.2-1) because
they are textures or large shapes. Sorted class-folder order is the label order. Output is byte-for-byte deterministic
given --seed (each image has its own RNG keyed on seed/split/class/index).

    python data_prep/make_synthetic.py --out data/synthetic [--train-per-class 120] [--val-per-class 30] [--size 64]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image

Gen = Callable[[np.random.Generator, int], np.ndarray]  # returns a float "foreground weight" map in [0, 1], (s, s)


def _coords(rng: np.random.Generator, s: int, angle_deg: float, jitter: float = 10.0) -> tuple[np.ndarray, np.ndarray]:
    """Pixel grid centred on a random point, rotated by angle_deg + uniform(-jitter, jitter) degrees."""
    cy, cx = rng.uniform(0.3 * s, 0.7 * s, size=2)
    y, x = np.mgrid[0:s, 0:s].astype(np.float64)
    y, x = y - cy, x - cx
    a = np.deg2rad(angle_deg + rng.uniform(-jitter, jitter))
    return x * np.cos(a) + y * np.sin(a), -x * np.sin(a) + y * np.cos(a)


def _wave(t: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Sinusoid of phase t (radians) with a random edge sharpness (soft sine .. near-square wave)."""
    k = rng.uniform(1.0, 6.0)
    return 0.5 + 0.5 * np.tanh(k * np.sin(t + rng.uniform(0, 2 * np.pi))) / np.tanh(k)


def grating(angle: float) -> Gen:
    """Stripes whose wave vector points at `angle` degrees (0: vertical stripes, 90: horizontal stripes)."""
    def gen(rng: np.random.Generator, s: int) -> np.ndarray:
        u, _ = _coords(rng, s, angle)
        return _wave(2 * np.pi * u / (rng.uniform(0.09, 0.22) * s), rng)
    return gen


def grating_diag(rng: np.random.Generator, s: int) -> np.ndarray:
    return grating(float(rng.choice([45.0, 135.0])))(rng, s)


def checker(rng: np.random.Generator, s: int) -> np.ndarray:
    u, v = _coords(rng, s, 0.0)
    p = rng.uniform(0.12, 0.3) * s
    return (np.sin(2 * np.pi * u / p) * np.sin(2 * np.pi * v / p) > 0).astype(np.float64)


def rings(rng: np.random.Generator, s: int) -> np.ndarray:
    u, v = _coords(rng, s, 0.0, jitter=0.0)
    return _wave(2 * np.pi * np.hypot(u, v) / (rng.uniform(0.09, 0.2) * s), rng)


def spokes(rng: np.random.Generator, s: int) -> np.ndarray:
    u, v = _coords(rng, s, 0.0, jitter=180.0)
    return _wave(int(rng.integers(6, 13)) * np.arctan2(v, u), rng)


def zigzag(rng: np.random.Generator, s: int) -> np.ndarray:
    u, v = _coords(rng, s, 0.0)
    px, py = rng.uniform(0.2, 0.4) * s, rng.uniform(0.1, 0.2) * s
    tri = np.abs((u / px) % 1.0 - 0.5) * 2.0  # triangle wave in [0, 1] along x
    return _wave(2 * np.pi * (v + rng.uniform(0.5, 1.0) * py * tri) / py, rng)


def dots(rng: np.random.Generator, s: int) -> np.ndarray:
    y, x = np.mgrid[0:s, 0:s]
    n = int(rng.integers(12, 30))
    cy, cx, r = rng.uniform(0, s, n), rng.uniform(0, s, n), rng.uniform(0.03, 0.07, n) * s
    d = np.hypot(y[None] - cy[:, None, None], x[None] - cx[:, None, None]) - r[:, None, None]
    return np.clip(0.5 - d.min(axis=0), 0.0, 1.0)


def blobs(rng: np.random.Generator, s: int) -> np.ndarray:
    """Thresholded low-pass noise: irregular cloud / maze-like regions."""
    f = np.fft.fftfreq(s)
    fy, fx = np.meshgrid(f, f, indexing="ij")
    spec = np.fft.fft2(rng.standard_normal((s, s))) * np.exp(-(fx**2 + fy**2) / (2 * rng.uniform(0.03, 0.06) ** 2))
    field = np.real(np.fft.ifft2(spec))
    return 0.5 + 0.5 * np.tanh(4.0 * field / (field.std() + 1e-8))


def triangle(rng: np.random.Generator, s: int) -> np.ndarray:
    """Large filled triangle (anti-aliased), random size, position and rotation."""
    u, v = _coords(rng, s, 0.0, jitter=180.0)
    r = rng.uniform(0.3, 0.45) * s
    # signed distance to each of the three edges of an equilateral triangle with inradius r / 2
    d = np.min([r / 2 - (u * np.cos(a) + v * np.sin(a)) for a in np.deg2rad([90.0, 210.0, 330.0])], axis=0)
    return np.clip(0.5 + d, 0.0, 1.0)


CLASSES: dict[str, Gen] = {
    "blobs": blobs, "checker": checker, "dots": dots, "grating_000": grating(0.0), "grating_090": grating(90.0),
    "grating_diag": grating_diag, "rings": rings, "spokes": spokes, "triangle": triangle, "zigzag": zigzag,
}


def _palette(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Random fg/bg RGB colours in [0, 1], contrasting in RGB and in luma (so greyscale copies keep the structure)."""
    while True:
        fg, bg = rng.uniform(0, 1, 3), rng.uniform(0, 1, 3)
        if np.linalg.norm(fg - bg) > 0.45 and abs(np.dot(fg - bg, [0.299, 0.587, 0.114])) > 0.15:
            return (fg, bg) if rng.random() < 0.5 else (bg, fg)


def render(gen: Gen, rng: np.random.Generator, size: int, grey_prob: float) -> Image.Image:
    w = gen(rng, size)[..., None]
    fg, bg = _palette(rng)
    img = bg + w * (fg - bg) + rng.normal(0.0, rng.uniform(0.02, 0.08), (size, size, 3))
    pil = Image.fromarray(np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8), "RGB")
    return pil.convert("L") if rng.random() < grey_prob else pil


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--train-per-class", type=int, default=120)
    ap.add_argument("--val-per-class", type=int, default=30)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    names = sorted(CLASSES)
    splits = {"train": a.train_per_class, "val": a.val_per_class}
    expected = {a.out / sp / c / f"{i}.jpg" for sp, n in splits.items() for c in names for i in range(n)}
    found = {p for sp in splits for c in names for p in (a.out / sp / c).glob("*.jpg")}
    summary = f"{len(names)} classes, {a.train_per_class}/{a.val_per_class} train/val per class at {a.out}"
    if found == expected:
        print(f"[make_synthetic] reusing existing dataset: {summary}")
        return
    t0 = time.time()
    for p in found - expected:  # stale images from an earlier run with other counts
        p.unlink()
    for si, (sp, n) in enumerate(splits.items()):
        for ci, c in enumerate(names):
            (a.out / sp / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                rng = np.random.default_rng([a.seed, si, ci, i])
                img = render(CLASSES[c], rng, a.size, grey_prob=0.05 if sp == "train" else 0.0)
                img.save(a.out / sp / c / f"{i}.jpg", format="JPEG", quality=90)
    print(f"[make_synthetic] wrote {len(expected)} images ({summary}) in {time.time() - t0:.1f}s: {', '.join(names)}")


if __name__ == "__main__":
    main()
