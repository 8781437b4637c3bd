"""An EfficientNet-Lite0 FP32/INT8 pair for speed benchmarks where no trained model is bundled.

Built with the project's own code (build_classifier, keras_to_onnx, quantize_int8, input
folding), so its speed is the speed of what ``edge-export`` ships. The 3-class head is untrained:
use it for timing only, never for accuracy.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edge_runtime.contract import ModelSpec, Precision, ResizePolicy
from export.convert import keras_to_onnx, write_metadata
from export.input_fold import fold_input_scaling
from export.quantize import QuantConfig, quantize_int8
from training.backbones import Backbone, pixel_scaling
from training.model import build_classifier
from training.synthetic import CLASSES, synthetic_scan

SIZE = 224


def export_speed_model(folder: Path) -> dict[Precision, Path]:
    """Write ``speed-fp32.onnx`` and ``speed-int8.onnx`` into ``folder``; returns their paths."""
    backbone = Backbone.EFFICIENTNET_LITE0
    model = build_classifier(len(CLASSES), backbone=backbone, input_size=SIZE, weights="imagenet")
    fp32, int8 = folder / "speed-fp32.onnx", folder / "speed-int8.onnx"
    keras_to_onnx(model, SIZE, fp32)
    rng = np.random.default_rng(0)
    calibration = np.stack(
        [synthetic_scan(CLASSES[i % 3], rng, size=(SIZE, SIZE)) for i in range(32)]
    )[..., None]
    config = QuantConfig()
    quantize_int8(fp32, int8, calibration, config)
    mean, std, _ = pixel_scaling(backbone)
    folded = fold_input_scaling(int8, mean, std)
    for path, precision, quant in (
        (fp32, Precision.FP32, {}),
        (int8, Precision.INT8, {**config.describe(), "input_scaling_folded": folded}),
    ):
        write_metadata(path, _spec(precision, quant))
    return {Precision.FP32: fp32, Precision.INT8: int8}


def _spec(precision: Precision, quantization: dict) -> ModelSpec:
    return ModelSpec(
        class_names=CLASSES,
        input_size=SIZE,
        resize_policy=ResizePolicy.LETTERBOX,
        precision=precision,
        backbone=Backbone.EFFICIENTNET_LITE0.value,
        model_version="speed-benchmark-untrained-head",
        temperature=1.0,
        abstain_threshold=0.0,
        training_data_fingerprint="none (ImageNet backbone, untrained head: timing only)",
        metrics={},
        quantization=quantization,
    )
