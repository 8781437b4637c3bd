"""The bundled model's training recipe: ``edge-train``'s defaults, so that a clinic training on
its own scans gets the validated recipe without copying flags.

Chosen by the scanner-held-out protocol (docs/experiments.md, "Scanner-style augmentation, and
v3"; docs/prereg/2026-12-02b-scanner-style-and-v3.md) and recorded, flag by flag, in
``scripts/train_default.sh`` (tests/test_recipe.py checks that the two agree). Scanner-style
augmentation was tried there and left out (0).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Recipe:
    """One training recipe; field names are ``edge-train``'s long options."""

    backbone: str = "efficientnet-lite0"
    image_size: int = 160  # pixels, square letterbox
    frozen_epochs: int = 2
    epochs: int = 6
    learning_rate: float = 0.001
    pixel_noise: float = 0.03  # largest std, fraction of full scale
    clutter: float = 0.5  # chance per training scan
    scanner_style: float = 0.0  # chance of each effect


DEFAULT = Recipe()
