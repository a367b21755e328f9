"""Synthetic chest CT: a body of soft tissue in air, two lungs, a spine and ribs, in Hounsfield units."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

AIR, LUNG, SOFT, BONE = -1000, -850, 40, 700
SHAPE = (48, 96, 96)
SPACING = (5.0, 3.5, 3.5)


def chest(seed: int, shape: tuple[int, int, int] = SHAPE) -> npt.NDArray[np.int16]:
    """One volume (z, y, x); each seed varies body size, lung size and noise."""
    return chest_with_truth(seed, shape)[0]


def chest_with_truth(
    seed: int, shape: tuple[int, int, int] = SHAPE
) -> tuple[npt.NDArray[np.int16], npt.NDArray[np.bool_]]:
    """A volume and its true lung mask (what a segmentation should find)."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij")
    vol = np.full(shape, AIR, dtype=np.float32)
    body = (x / rng.uniform(0.80, 0.92)) ** 2 + (y / rng.uniform(0.55, 0.68)) ** 2 <= 1
    vol[body] = SOFT
    lung_r = rng.uniform(0.26, 0.32)
    taper = 1 - 0.35 * np.clip(z, 0, 1)
    for side in (-1, 1):
        lung = ((x - side * 0.38) / (lung_r * taper)) ** 2 + (y / (0.42 * taper)) ** 2 + (z / 0.95) ** 2 <= 1
        vol[lung & body] = LUNG
    spine = (x / 0.09) ** 2 + ((y - 0.45) / 0.09) ** 2 <= 1
    truth = vol == LUNG
    vol[spine] = BONE
    ring = np.abs(np.sqrt((x / 0.86) ** 2 + (y / 0.6) ** 2) - 0.93) < 0.035
    ribs = ring & (np.sin(z * 9 * np.pi) > 0.3) & body
    vol[ribs] = BONE
    truth &= ~ribs
    vol += rng.normal(0, 25, shape).astype(np.float32)
    return np.clip(vol, -1024, 3071).astype(np.int16), truth
