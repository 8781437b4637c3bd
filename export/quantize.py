"""FP32 ONNX -> INT8 QDQ with onnxruntime's tools, behind one typed configuration."""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from enum import Enum
from pathlib import Path

import numpy as np
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

from edge_runtime.contract import INPUT_NAME

log = logging.getLogger(__name__)


class Calibration(str, Enum):
    MINMAX = "minmax"
    PERCENTILE = "percentile"
    ENTROPY = "entropy"


class IntType(str, Enum):
    U8 = "uint8"
    S8 = "int8"


_ORT_TYPES = {IntType.U8: QuantType.QUInt8, IntType.S8: QuantType.QInt8}
_ORT_CALIBRATION = {
    Calibration.MINMAX: CalibrationMethod.MinMax,
    Calibration.PERCENTILE: CalibrationMethod.Percentile,
    Calibration.ENTROPY: CalibrationMethod.Entropy,
}


@dataclass(frozen=True)
class QuantConfig:
    """INT8 settings. Default U8S8 (uint8 activations, int8 per-channel weights): on x86 with
    VNNI it fuses every convolution, while S8S8 left convolutions in FP32 and ran slower."""

    activations: IntType = IntType.U8
    weights: IntType = IntType.S8
    per_channel: bool = True
    calibration: Calibration = Calibration.MINMAX
    max_calibration_images: int = 256
    batch_size: int = 16

    def describe(self) -> dict[str, object]:
        """The settings as plain values, for the model's metadata."""
        return {
            **{k: (v.value if isinstance(v, Enum) else v) for k, v in asdict(self).items()},
            "format": "QDQ",
        }


class _BatchReader(CalibrationDataReader):
    """Feeds uint8 batches to onnxruntime's calibrator; returns None when exhausted."""

    def __init__(self, batches: Iterator[np.ndarray]) -> None:
        self._batches = batches

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        return None if batch is None else {INPUT_NAME: batch}


def quantize_int8(
    fp32_path: Path, int8_path: Path, images: np.ndarray, config: QuantConfig
) -> Path:
    """Quantize ``fp32_path`` into ``int8_path``, calibrating on uint8 ``[N,S,S,1]`` images.

    Args:
        images: calibration images from the training split (never test images), already
            preprocessed by the runtime's own function.
    """
    if len(images) == 0:
        raise ValueError("Quantization needs at least one calibration image. Got none.")
    images = images[: config.max_calibration_images]
    batches = (images[i : i + config.batch_size] for i in range(0, len(images), config.batch_size))
    extra = {"CalibMovingAverage": False}
    if config.calibration is Calibration.PERCENTILE:
        extra["CalibPercentile"] = 99.999
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        quantize_static(
            str(prepared),
            str(int8_path),
            _BatchReader(iter(batches)),
            quant_format=QuantFormat.QDQ,
            activation_type=_ORT_TYPES[config.activations],
            weight_type=_ORT_TYPES[config.weights],
            per_channel=config.per_channel,
            calibrate_method=_ORT_CALIBRATION[config.calibration],
            extra_options=extra,
        )
    return int8_path
