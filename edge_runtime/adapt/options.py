"""What ``edge-classify adapt`` is asked (:class:`AdaptOptions`), what it reports or refuses, and
the parent model it starts from."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_runtime.adapt.fit import Head
from edge_runtime.model.contract import ModelSpec, Precision
from edge_runtime.model.session import Provider

RECORD_VERSION = 1


class AdaptRefused(RuntimeError):
    """The site's scans do not justify an adapted model; nothing was written."""


@dataclass(frozen=True)
class AdaptOptions:
    """What to adapt, to which scans, and where the result goes."""

    site: Path
    output: Path
    model: str | os.PathLike[str] | None = None  # None: the bundled INT8 model
    site_name: str | None = None  # default: the site folder's (or manifest's) name
    provider: Provider = Provider.AUTO
    threads: int | None = None
    batch_size: int = 8
    max_malignant_lost: int = 1  # refuse when CV loses more of the cancers the parent caught
    max_sensitivity_drop: float | None = None  # and, if given, when sensitivity falls by more
    precision: Precision | None = None  # None: the parent's; FP32: the FP32 adapted model alone
    seed: int = 0

    def __post_init__(self) -> None:
        """Check the bounds before any model loads or scan is read.

        Raises:
            ValueError: ``max_malignant_lost`` below 0 or not whole, ``max_sensitivity_drop``
                outside [0, 1], or ``batch_size`` below 1.
        """
        lost = self.max_malignant_lost
        if isinstance(lost, bool) or not isinstance(lost, int) or lost < 0:
            raise ValueError(
                "--max-malignant-lost (max_malignant_lost) must be a whole number >= 0: the "
                f"malignant scans the parent caught that the adapted model may lose. Got {lost!r} "
                "instead."
            )
        drop = self.max_sensitivity_drop
        if drop is not None and not 0 <= drop <= 1:
            raise ValueError(
                "--max-sensitivity-drop (max_sensitivity_drop) must be in [0, 1]. Got "
                f"{drop!r} instead."
            )
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1. Got {self.batch_size!r} instead.")


@dataclass(frozen=True)
class AdaptReport:
    """What ``adapt`` measured and wrote."""

    written: tuple[Path, ...]
    record: dict[str, Any]  # the adaptation metadata of the adapted model


@dataclass(frozen=True)
class Parent:
    """A model file as adaptation starts from it (:mod:`edge_runtime.adapt.parent`): an adapted
    model stands for its own parent, found by its SHA-256 or rebuilt from its record."""

    path: Path
    proto: Any  # onnx.ModelProto
    spec: ModelSpec  # the parent's own spec (before any adaptation)
    head: Head  # the parent's own last layer
    name: str  # the parent's file name
    sha256: str
    unwrapped_from: str | None  # the adapted file it was recovered from, if any
    origin: str | None = None  # where the parent's own file lies (or last lay), absolute
