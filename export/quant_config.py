"""The INT8 quantization settings: one typed config, importable without the export extra (so
that ``edge-export --help`` shows its defaults on a base install). :mod:`export.quantize`
translates it into onnxruntime's arguments."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from enum import Enum

__all__ = ["Calibration", "IntType", "QuantConfig"]


class Calibration(str, Enum):
    """How activation ranges are read from the calibration images."""

    MINMAX = "minmax"
    PERCENTILE = "percentile"
    ENTROPY = "entropy"


class IntType(str, Enum):
    """8-bit integer type of activations or weights."""

    U8 = "uint8"
    S8 = "int8"


@dataclass(frozen=True)
class QuantConfig:
    """INT8 settings, translated into onnxruntime's arguments in one place.

    The defaults were chosen by measurement (``python -m export.measure_quant``; the numbers are
    in docs/experiments.md, "Quantization settings").

    Attributes:
        activations: activation type; uint8 is the fast one on x86.
        weights: weight type; int8 (symmetric) is what the integer kernels expect.
        per_channel: one scale per output channel of each weight (needed for depthwise convs).
        calibration: how activation ranges are chosen.
        percentile: the percentile kept by ``Calibration.PERCENTILE``.
        float_convs: the first this many convolutions (of each ensemble member), and the
            residual additions among them, stay in float: rounding errors made early are
            amplified by every later layer. 2, the bundled model's: on v3, INT8 alone agreed with
            FP32 on 0.992 of the test scans with 13.6% rechecked, against 0.979 and 20.1% with
            none, and ran faster (docs/experiments.md, decision 10).
        max_calibration_images: at most this many training images are used for calibration.
        batch_size: calibration batch size.
    """

    activations: IntType = IntType.U8
    weights: IntType = IntType.S8
    per_channel: bool = True
    calibration: Calibration = Calibration.MINMAX
    percentile: float = 99.999
    float_convs: int = 2
    max_calibration_images: int = 256
    batch_size: int = 16

    def __post_init__(self) -> None:
        if self.max_calibration_images < 1:
            raise ValueError(
                "The 'max_calibration_images' parameter of QuantConfig must be >= 1. "
                f"Got {self.max_calibration_images} instead."
            )
        if self.float_convs < 0:
            raise ValueError(
                "The 'float_convs' parameter of QuantConfig must be >= 0. "
                f"Got {self.float_convs} instead."
            )
        if not 90.0 <= self.percentile <= 100.0:
            raise ValueError(
                "The 'percentile' parameter of QuantConfig must be in [90, 100]. "
                f"Got {self.percentile} instead."
            )

    @property
    def label(self) -> str:
        """Short name such as ``U8S8-minmax``."""
        short = {IntType.U8: "U8", IntType.S8: "S8"}
        return f"{short[self.activations]}{short[self.weights]}-{self.calibration.value}"

    def describe(self) -> dict[str, object]:
        """The settings as plain values, for the model's metadata and card."""
        settings = {k: (v.value if isinstance(v, Enum) else v) for k, v in asdict(self).items()}
        if self.calibration is not Calibration.PERCENTILE:
            del settings["percentile"]
        return {
            **settings,
            "format": "QDQ",
            "preprocess": "quant_pre_process",
            "onnxruntime": _onnxruntime_version(),
        }


def _onnxruntime_version() -> str:
    import onnxruntime

    return onnxruntime.__version__
