"""FP32 ONNX -> INT8 QDQ with onnxruntime's tools, behind one typed configuration."""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

from edge_runtime.model.contract import INPUT_NAME
from edge_runtime.model.external_data import external_data_files
from export.quant_config import Calibration, IntType, QuantConfig

log = logging.getLogger(__name__)


_ORT_TYPES = {IntType.U8: QuantType.QUInt8, IntType.S8: QuantType.QInt8}
_ORT_CALIBRATION = {
    Calibration.MINMAX: CalibrationMethod.MinMax,
    Calibration.PERCENTILE: CalibrationMethod.Percentile,
    Calibration.ENTROPY: CalibrationMethod.Entropy,
}


AUTO_PERCENTILES = (99.99, 99.999, 99.9999)


def calibration_candidates(base: QuantConfig) -> list[QuantConfig]:
    """What ``edge-export --calibration auto`` tries, in order of preference on ties: MinMax,
    then Percentile at each of :data:`AUTO_PERCENTILES`; everything else as in ``base``."""
    return [replace(base, calibration=Calibration.MINMAX)] + [
        replace(base, calibration=Calibration.PERCENTILE, percentile=p) for p in AUTO_PERCENTILES
    ]


def calibration_name(config: QuantConfig) -> str:
    """``minmax``, ``entropy`` or ``percentile 99.999``."""
    if config.calibration is Calibration.PERCENTILE:
        return f"percentile {config.percentile:g}"
    return config.calibration.value


class _BatchReader(CalibrationDataReader):
    """Feeds uint8 batches to onnxruntime's calibrator; returns None when exhausted."""

    def __init__(self, batches: Iterator[np.ndarray]) -> None:
        self._batches = batches

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        return None if batch is None else {INPUT_NAME: batch}


def prepare_for_quantization(fp32_path: Path, prepared_path: Path) -> Path:
    """Run onnxruntime's ``quant_pre_process`` (constant folding, BatchNorm folding, shapes).

    The INT8 model's tensor names follow the prepared model, so compare against this file when
    hunting for the layer that loses accuracy (:mod:`export.diagnose`). An FP32 model with
    external-data files (a bundled one over the file limit) is first joined into one file beside
    ``prepared_path``: the optimized graph ``quant_pre_process`` writes in its own temporary
    folder would still point at them.
    """
    if external_data_files(fp32_path):
        whole = prepared_path.with_name(f"whole-{fp32_path.name}")
        onnx.save(onnx.load(str(fp32_path)), str(whole))
        fp32_path = whole
    quant_pre_process(str(fp32_path), str(prepared_path), skip_symbolic_shape=True)
    return prepared_path


def float_prefix(graph: onnx.GraphProto, convs: int) -> list[str]:
    """Names of the first ``convs`` convolutions on every path from the input (those with at
    most ``convs`` convolutions on their way from it, themselves included: in a chain, the
    first ``convs``; in an ensemble, each member's first ``convs``), and of the additions that
    only add outputs of those (or of each other): a residual sum inside the float prefix stays
    float too, instead of being rounded to 8 bits between two float layers."""
    names: list[str] = []
    float_outputs: set[str] = set()
    depth: dict[str, int] = {}  # tensor -> convolutions on the longest path from the input
    for node in graph.node:  # topological order
        reached = max((depth.get(name, 0) for name in node.input), default=0)
        reached += node.op_type == "Conv"
        depth.update((name, reached) for name in node.output)
        if node.op_type == "Conv" and reached > convs:
            continue
        if node.op_type != "Conv" and not (
            node.op_type == "Add" and all(i in float_outputs for i in node.input)
        ):
            continue
        names.append(node.name)
        float_outputs.update(node.output)
    return names


def every_conv_float(model_path: Path, convs: int) -> bool:
    """Whether :func:`float_prefix` with ``convs`` keeps every convolution of the model at
    ``model_path`` (the prepared FP32 model) in float."""
    graph = onnx.load(str(model_path)).graph
    kept = set(float_prefix(graph, convs))
    return all(node.name in kept for node in graph.node if node.op_type == "Conv")


def quantize_int8(
    fp32_path: Path,
    int8_path: Path,
    images: np.ndarray,
    config: QuantConfig,
    *,
    prepared_path: Path | None = None,
) -> Path:
    """Quantize ``fp32_path`` into ``int8_path``, calibrating on uint8 ``[N,S,S,1]`` images.

    Args:
        fp32_path: the FP32 model.
        int8_path: where the QDQ model goes.
        images: calibration images from the training split (never test images), already
            preprocessed by the runtime's own function.
        config: the quantization settings.
        prepared_path: where to keep the pre-processed FP32 model (for diagnosis); by default
            it is written to a temporary folder and removed.

    Returns:
        ``int8_path``.

    Raises:
        ValueError: no calibration images.
    """
    if len(images) == 0:
        raise ValueError("Quantization needs at least one calibration image. Got none.")
    images = images[: config.max_calibration_images]
    # Equal batches: onnxruntime's histogram calibrators (percentile, entropy) stack the batches'
    # outputs and fail on a shorter last batch, so the few images past the last full one go.
    size = min(config.batch_size, len(images))
    images = images[: len(images) - len(images) % size]
    batches = (images[i : i + size] for i in range(0, len(images), size))
    extra: dict[str, object] = {"CalibMovingAverage": False}
    if config.calibration is Calibration.PERCENTILE:
        extra["CalibPercentile"] = config.percentile
    with tempfile.TemporaryDirectory(prefix=".quantize-") as tmp:
        prepared = prepared_path or Path(tmp) / "prepared.onnx"
        prepare_for_quantization(fp32_path, prepared)
        kept_float = float_prefix(onnx.load(str(prepared)).graph, config.float_convs)
        quantize_static(
            str(prepared),
            str(int8_path),
            _BatchReader(iter(batches)),
            quant_format=QuantFormat.QDQ,
            activation_type=_ORT_TYPES[config.activations],
            weight_type=_ORT_TYPES[config.weights],
            per_channel=config.per_channel,
            calibrate_method=_ORT_CALIBRATION[config.calibration],
            nodes_to_exclude=kept_float,
            extra_options=extra,
        )
    log.debug("quantized %s with %s", fp32_path, config.describe())
    return int8_path
