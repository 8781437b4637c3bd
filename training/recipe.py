"""The bundled model's training recipe: ``edge-train``'s defaults, so that a clinic training on
its own scans gets the validated recipe without copying flags.

The members and the lesion map's source were chosen by the v4 frontier's pre-registered criteria
(docs/frontier.md; docs/prereg/2026-12-06e-v4-without-flips.md); each member's options by the
scanner-held-out protocol (docs/experiments.md, "Scanner-style augmentation, and v3";
docs/prereg/2026-12-02b-scanner-style-and-v3.md). ``scripts/train_default.sh`` records the recipe
flag by flag (tests/test_recipe.py checks that the two agree). Scanner-style augmentation was
tried there and left out (0).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Recipe:
    """One training recipe; field names are ``edge-train``'s long options."""

    # one model per backbone, averaged into one graph when there are several (training.ensemble)
    backbone: tuple[str, ...] = ("efficientnet-lite0", "efficientnet-lite2")
    lesion_from: tuple[int, ...] = (1,)  # members (1 = the first) whose lesion map is the graph's
    image_size: int = 160  # pixels, square letterbox
    frozen_epochs: int = 2
    epochs: int = 6
    learning_rate: float = 0.001
    pixel_noise: float = 0.03  # largest std, fraction of full scale
    clutter: float = 0.5  # chance per training scan
    scanner_style: float = 0.0  # chance of each effect


DEFAULT = Recipe()
