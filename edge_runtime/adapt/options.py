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


@dataclass(frozen=True)
class AdaptReport:
    """What ``adapt`` measured and wrote."""

    written: tuple[Path, ...]
    record: dict[str, Any]  # the adaptation metadata of the adapted model


@dataclass(frozen=True)
class Parent:
    """A model file as adaptation starts from it (unwrapped when it is itself adapted)."""

    path: Path
    proto: Any  # onnx.ModelProto
    spec: ModelSpec  # the parent's own spec (before any adaptation)
    head: Head  # the parent's own last layer
    name: str  # the parent's file name
    sha256: str
    unwrapped_from: str | None  # the adapted file it was recovered from, if any
