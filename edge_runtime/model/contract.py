"""The model contract: what every edge-classify ONNX model must look like.

Export writes it and the runtime checks it, both through this module, so the two sides cannot
drift apart. See DESIGN.md section 2.

Input ``image``: uint8 ``[N, H, W, 1]`` (batch dynamic). Outputs ``probabilities``: float32
``[N, K]`` softmax in the order of ``class_names``; ``cam``: float32 ``[N, h, w, K]`` class
activation maps. Contract version 2 adds two optional outputs: ``lesion``, float32
``[N, h, w, 1]``, the lesion probability per pixel of the square input at a stride the metadata
states (with its decision threshold), and ``features``, float32 ``[N, D]``, the pooled embedding
the classifier's last layer reads. Version 3 adds parts of the lesion rule: a minimum lesion area,
the ``lesion_head_or_classifier`` normal rule and its normal gate; a model writes 3 only when it
uses one.
Version 1 models (neither output) stay valid. Metadata lives in ``metadata_props``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

CONTRACT_VERSION = "2"
# written instead of CONTRACT_VERSION by a model whose lesion rule needs version 3 to be read
# right (a minimum lesion area, or the lesion_head_or_classifier normal rule and its gate): an
# older runtime then refuses it instead of drawing lesions by a rule it does not know
LESION_RULE_CONTRACT_VERSION = "3"
READABLE_CONTRACT_VERSIONS = frozenset({"1", "2", "3"})
INPUT_NAME = "image"
PROBABILITIES = "probabilities"
CAM = "cam"
LESION = "lesion"  # optional (v2): lesion probability per pixel, [N, h, w, 1]
FEATURES = "features"  # optional (v2): pooled embedding the last layer reads, [N, D]


class ResizePolicy(str, Enum):
    """How a scan is fitted into the model's square input."""

    LETTERBOX = "letterbox"  # aspect-preserving resize, centred, zero padding
    STRETCH = "stretch"  # plain resize; distorts lesion shape, kept for foreign models


class Precision(str, Enum):
    FP32 = "fp32"
    FP16 = "fp16"
    INT8 = "int8"


class NormalRule(str, Enum):
    """How a model with a normal class calls a scan normal."""

    CLASSIFIER = "classifier"  # the classifier's call
    LESION_HEAD = "lesion_head"  # normal exactly when the lesion output finds no lesion
    # normal when the lesion output finds no lesion or the classifier calls normal (v3)
    LESION_HEAD_OR_CLASSIFIER = "lesion_head_or_classifier"


class ContractError(ValueError):
    """A model file does not meet the edge-classify contract."""


# Keys of metadata_props. The two ``Image.*`` keys are the ones ONNX's MetadataProps.md defines.
KEY_CONTRACT_VERSION = "edge_classify.contract_version"
KEY_CLASS_NAMES = "edge_classify.class_names"
KEY_INPUT_SIZE = "edge_classify.input_size"
KEY_INPUT_LAYOUT = "edge_classify.input_layout"
KEY_RESIZE_POLICY = "edge_classify.resize_policy"
KEY_PRECISION = "edge_classify.precision"
KEY_BACKBONE = "edge_classify.backbone"
KEY_MODEL_VERSION = "edge_classify.model_version"
KEY_DATA_FINGERPRINT = "edge_classify.training_data_fingerprint"
KEY_METRICS = "edge_classify.metrics"
KEY_TEMPERATURE = "edge_classify.temperature"
KEY_ABSTAIN_THRESHOLD = "edge_classify.abstain_threshold"
KEY_QUANTIZATION = "edge_classify.quantization"
KEY_RECHECK_MARGIN = "edge_classify.fp32_recheck_margin"
KEY_RECHECK_MODEL = "edge_classify.fp32_recheck_model"
KEY_RECHECK_MALIGNANT_MARGIN = "edge_classify.fp32_recheck_malignant_margin"
KEY_RECHECK_LESION_MARGIN = "edge_classify.fp32_recheck_lesion_margin"
KEY_LESION_STRIDE = "edge_classify.lesion_stride"
KEY_LESION_THRESHOLD = "edge_classify.lesion_threshold"
KEY_LESION_MIN_AREA = "edge_classify.lesion_min_area"
KEY_NORMAL_GATE = "edge_classify.normal_gate"
KEY_MALIGNANT_THRESHOLD = "edge_classify.malignant_threshold"
KEY_UNFAMILIAR = "edge_classify.unfamiliar"
KEY_ADAPTATION = "edge_classify.adaptation"
KEY_NORMAL_RULE = "edge_classify.normal_rule"
KEY_PIXEL_FORMAT = "Image.BitmapPixelFormat"
KEY_PIXEL_RANGE = "Image.NominalPixelRange"

PIXEL_FORMAT = "Gray8"
PIXEL_RANGE = "NominalRange_0_255"
INPUT_LAYOUT = "NHWC"


@dataclass(frozen=True)
class ModelSpec:
    """Everything the runtime needs to know about a model, read from its metadata."""

    class_names: tuple[str, ...]
    input_size: int
    resize_policy: ResizePolicy = ResizePolicy.LETTERBOX
    precision: Precision = Precision.FP32
    backbone: str = "unknown"
    model_version: str = "0"
    temperature: float = 1.0
    abstain_threshold: float = 0.0
    training_data_fingerprint: str = ""
    metrics: Mapping[str, Any] = field(default_factory=dict)
    quantization: Mapping[str, Any] = field(default_factory=dict)
    recheck_margin: float = 0.0  # rerun in FP32 the scans whose top-1 lead is below this
    recheck_model: str = ""  # file name of that FP32 model, beside this one
    # also rerun those whose calibrated P(malignant) is within this of the operating point
    recheck_malignant_margin: float = 0.0
    # and those whose lesion map peaks within this of the lesion threshold
    recheck_lesion_margin: float = 0.0
    # input pixels per pixel of the ``lesion`` output; 0: the model has no lesion output
    lesion_stride: int = 0
    lesion_threshold: float = 0.5  # a pixel is lesion when its probability is >= this
    # a largest lesion region smaller than this share of the square input is no lesion (v3)
    lesion_min_area: float = 0.0
    # call a scan malignant when P(malignant) >= this (after calibration); 0: plain top-1
    malignant_threshold: float = 0.0
    unfamiliar: Mapping[str, Any] = field(default_factory=dict)  # the unfamiliar-scan score
    adaptation: Mapping[str, Any] = field(default_factory=dict)  # set by `edge-classify adapt`
    normal_rule: NormalRule = NormalRule.CLASSIFIER
    # lesion_head_or_classifier: a calibrated P(normal) at or above this also calls normal
    # (0: only the classifier's call does; v3)
    normal_gate: float = 0.0

    def to_metadata(self) -> dict[str, str]:
        """Serialize to ``metadata_props`` (string to string)."""
        # a normal gate needs the lesion_head_or_classifier rule (_check_thresholds)
        needs_v3 = (
            self.lesion_min_area > 0 or self.normal_rule is NormalRule.LESION_HEAD_OR_CLASSIFIER
        )
        return {
            KEY_CONTRACT_VERSION: LESION_RULE_CONTRACT_VERSION if needs_v3 else CONTRACT_VERSION,
            KEY_CLASS_NAMES: json.dumps(list(self.class_names)),
            KEY_INPUT_SIZE: str(self.input_size),
            KEY_INPUT_LAYOUT: INPUT_LAYOUT,
            KEY_RESIZE_POLICY: self.resize_policy.value,
            KEY_PRECISION: self.precision.value,
            KEY_BACKBONE: self.backbone,
            KEY_MODEL_VERSION: self.model_version,
            KEY_DATA_FINGERPRINT: self.training_data_fingerprint,
            KEY_METRICS: json.dumps(dict(self.metrics), sort_keys=True),
            KEY_TEMPERATURE: repr(float(self.temperature)),
            KEY_ABSTAIN_THRESHOLD: repr(float(self.abstain_threshold)),
            KEY_QUANTIZATION: json.dumps(dict(self.quantization), sort_keys=True),
            KEY_RECHECK_MARGIN: repr(float(self.recheck_margin)),
            KEY_RECHECK_MODEL: self.recheck_model,
            KEY_RECHECK_MALIGNANT_MARGIN: repr(float(self.recheck_malignant_margin)),
            KEY_RECHECK_LESION_MARGIN: repr(float(self.recheck_lesion_margin)),
            KEY_LESION_STRIDE: str(int(self.lesion_stride)),
            KEY_LESION_THRESHOLD: repr(float(self.lesion_threshold)),
            KEY_LESION_MIN_AREA: repr(float(self.lesion_min_area)),
            KEY_MALIGNANT_THRESHOLD: repr(float(self.malignant_threshold)),
            KEY_UNFAMILIAR: json.dumps(dict(self.unfamiliar), sort_keys=True),
            KEY_ADAPTATION: json.dumps(dict(self.adaptation), sort_keys=True),
            KEY_NORMAL_RULE: self.normal_rule.value,
            KEY_NORMAL_GATE: repr(float(self.normal_gate)),
            KEY_PIXEL_FORMAT: PIXEL_FORMAT,
            KEY_PIXEL_RANGE: PIXEL_RANGE,
        }

    @classmethod
    def from_metadata(cls, meta: Mapping[str, str], *, source: str = "model") -> ModelSpec:
        """Parse and validate ``metadata_props``.

        Raises:
            ContractError: a key is missing or holds a value the runtime cannot use.
        """
        required = (KEY_CONTRACT_VERSION, KEY_CLASS_NAMES, KEY_INPUT_SIZE, KEY_RESIZE_POLICY)
        missing = [key for key in required if key not in meta]
        if missing:
            raise ContractError(
                f"{source}: metadata lacks {', '.join(missing)}. Export the model with "
                "`edge-export`, which writes the edge-classify contract metadata."
            )
        if meta[KEY_CONTRACT_VERSION] not in READABLE_CONTRACT_VERSIONS:
            raise ContractError(
                f"{source}: contract version {meta[KEY_CONTRACT_VERSION]!r} is not supported "
                f"(this runtime reads versions {sorted(READABLE_CONTRACT_VERSIONS)})."
            )
        _expect(meta, KEY_INPUT_LAYOUT, INPUT_LAYOUT, source)
        _expect(meta, KEY_PIXEL_FORMAT, PIXEL_FORMAT, source)
        _expect(meta, KEY_PIXEL_RANGE, PIXEL_RANGE, source)
        try:
            class_names = tuple(json.loads(meta[KEY_CLASS_NAMES]))
            input_size = int(meta[KEY_INPUT_SIZE])
            spec = cls(
                class_names=class_names,
                input_size=input_size,
                resize_policy=ResizePolicy(meta[KEY_RESIZE_POLICY]),
                precision=Precision(meta.get(KEY_PRECISION, Precision.FP32.value)),
                backbone=meta.get(KEY_BACKBONE, "unknown"),
                model_version=meta.get(KEY_MODEL_VERSION, "0"),
                temperature=float(meta.get(KEY_TEMPERATURE, "1.0")),
                abstain_threshold=float(meta.get(KEY_ABSTAIN_THRESHOLD, "0.0")),
                training_data_fingerprint=meta.get(KEY_DATA_FINGERPRINT, ""),
                metrics=json.loads(meta.get(KEY_METRICS, "{}")),
                quantization=json.loads(meta.get(KEY_QUANTIZATION, "{}")),
                recheck_margin=float(meta.get(KEY_RECHECK_MARGIN, "0.0")),
                recheck_model=meta.get(KEY_RECHECK_MODEL, ""),
                recheck_malignant_margin=float(meta.get(KEY_RECHECK_MALIGNANT_MARGIN, "0.0")),
                recheck_lesion_margin=float(meta.get(KEY_RECHECK_LESION_MARGIN, "0.0")),
                lesion_stride=int(meta.get(KEY_LESION_STRIDE, "0")),
                lesion_threshold=float(meta.get(KEY_LESION_THRESHOLD, "0.5")),
                lesion_min_area=float(meta.get(KEY_LESION_MIN_AREA, "0.0")),
                malignant_threshold=float(meta.get(KEY_MALIGNANT_THRESHOLD, "0.0")),
                unfamiliar=json.loads(meta.get(KEY_UNFAMILIAR, "{}")),
                adaptation=json.loads(meta.get(KEY_ADAPTATION, "{}")),
                normal_rule=NormalRule(meta.get(KEY_NORMAL_RULE, NormalRule.CLASSIFIER.value)),
                normal_gate=float(meta.get(KEY_NORMAL_GATE, "0.0")),
            )
        except (ValueError, TypeError) as exc:
            raise ContractError(f"{source}: unreadable contract metadata: {exc}") from exc
        if len(class_names) < 2 or not all(isinstance(n, str) and n for n in class_names):
            raise ContractError(
                f"{source}: class names must be at least two non-empty strings. "
                f"Got {list(class_names)!r} instead."
            )
        if not 16 <= input_size <= 4096:
            raise ContractError(f"{source}: input size must be 16..4096. Got {input_size}.")
        if not spec.temperature > 0:
            raise ContractError(f"{source}: temperature must be > 0. Got {spec.temperature}.")
        if not 0.0 <= spec.abstain_threshold <= 1.0:
            raise ContractError(
                f"{source}: abstain threshold must be in [0, 1]. Got {spec.abstain_threshold}."
            )
        _check_recheck(spec, source)
        _check_thresholds(spec, source)
        return spec

    @property
    def rechecks(self) -> bool:
        """Whether the model names an FP32 model to rerun the scans it is unsure of."""
        return (
            max(self.recheck_margin, self.recheck_malignant_margin, self.recheck_lesion_margin) > 0
        )

    @property
    def has_lesion(self) -> bool:
        """Whether the model has the optional ``lesion`` output (contract v2)."""
        return self.lesion_stride > 0


def _check_thresholds(spec: ModelSpec, source: str) -> None:
    if spec.lesion_stride < 0 or spec.lesion_stride > spec.input_size:
        raise ContractError(
            f"{source}: lesion stride must be 0 (no lesion output) or 1..{spec.input_size}. "
            f"Got {spec.lesion_stride} instead."
        )
    if not 0.0 < spec.lesion_threshold < 1.0:
        raise ContractError(
            f"{source}: lesion threshold must be in (0, 1). Got {spec.lesion_threshold} instead."
        )
    if not 0.0 <= spec.lesion_min_area < 1.0:
        raise ContractError(
            f"{source}: lesion minimum area must be a share of the input in [0, 1). Got "
            f"{spec.lesion_min_area} instead."
        )
    if not 0.0 <= spec.normal_gate < 1.0:
        raise ContractError(
            f"{source}: normal gate must be a probability in [0, 1). Got {spec.normal_gate} "
            "instead."
        )
    if not 0.0 <= spec.malignant_threshold < 1.0:
        raise ContractError(
            f"{source}: malignant threshold must be in [0, 1). Got {spec.malignant_threshold} "
            "instead."
        )
    if spec.normal_gate > 0 and spec.normal_rule is not NormalRule.LESION_HEAD_OR_CLASSIFIER:
        raise ContractError(
            f"{source}: a normal gate ({spec.normal_gate}) needs the lesion_head_or_classifier "
            f"normal rule. Got {spec.normal_rule.value} instead."
        )
    if spec.lesion_min_area > 0 and not spec.has_lesion:
        raise ContractError(
            f"{source}: a lesion minimum area ({spec.lesion_min_area}) needs a lesion output."
        )
    if spec.normal_rule is not NormalRule.CLASSIFIER and not (
        spec.has_lesion and "normal" in spec.class_names
    ):
        raise ContractError(
            f"{source}: the {spec.normal_rule.value} normal rule needs a lesion output and a "
            "'normal' class."
        )
    if spec.malignant_threshold > 0.0 and "malignant" not in spec.class_names:
        raise ContractError(
            f"{source}: a malignant threshold needs a 'malignant' class. Got classes "
            f"{list(spec.class_names)} instead."
        )


def _check_recheck(spec: ModelSpec, source: str) -> None:
    for what, margin in (
        ("FP32 recheck margin", spec.recheck_margin),
        ("FP32 recheck margin of P(malignant)", spec.recheck_malignant_margin),
        ("FP32 recheck margin of the lesion map", spec.recheck_lesion_margin),
    ):
        if not 0.0 <= margin <= 1.0:
            raise ContractError(f"{source}: {what} must be in [0, 1]. Got {margin}.")
    if not spec.rechecks:
        return
    if spec.precision is Precision.FP32:
        raise ContractError(f"{source}: an FP32 model cannot ask for an FP32 recheck.")
    name = spec.recheck_model
    if not name or name != name.strip() or "/" in name or "\\" in name or name in {".", ".."}:
        raise ContractError(
            f"{source}: the FP32 recheck model must be a file name beside the model. "
            f"Got {name!r} instead."
        )


def check_recheck_partner(spec: ModelSpec, partner: ModelSpec, *, source: str) -> None:
    """Check that ``partner`` is the FP32 model that ``spec``'s INT8 answers are rechecked with.

    Raises:
        ContractError: naming the first field in which the two models differ.
    """
    if partner.precision is not Precision.FP32:
        raise ContractError(
            f"{source}: the FP32 recheck model must be FP32. Got {partner.precision.value}."
        )
    for name in (
        "class_names",
        "input_size",
        "resize_policy",
        "model_version",
        "training_data_fingerprint",
        "lesion_stride",  # the rechecked rows replace the lesion rows too
    ):
        if getattr(partner, name) != getattr(spec, name):
            raise ContractError(
                f"{source}: is not the FP32 model of the INT8 model it should recheck: its "
                f"{name} is {getattr(partner, name)!r}, the INT8 model's "
                f"{getattr(spec, name)!r}."
            )


def _expect(meta: Mapping[str, str], key: str, value: str, source: str) -> None:
    if meta.get(key) != value:
        raise ContractError(
            f"{source}: metadata {key} must be {value!r}. Got {meta.get(key)!r} instead."
        )


@dataclass(frozen=True)
class TensorInfo:
    """Name, element type and shape of one graph input or output (as onnxruntime reports)."""

    name: str
    type: str  # onnxruntime's spelling, e.g. "tensor(uint8)"
    shape: tuple[int | str | None, ...]


def check_io(
    inputs: list[TensorInfo], outputs: list[TensorInfo], spec: ModelSpec, *, source: str = "model"
) -> None:
    """Check the graph's inputs and outputs against the contract and the model's own metadata.

    Raises:
        ContractError: naming the tensor, what was expected and what was found.
    """
    if len(inputs) != 1 or inputs[0].name != INPUT_NAME:
        raise ContractError(
            f"{source}: must have exactly one input named {INPUT_NAME!r}. "
            f"Got {[i.name for i in inputs]} instead."
        )
    image = inputs[0]
    size = spec.input_size
    if image.type != "tensor(uint8)" or len(image.shape) != 4:
        raise ContractError(
            f"{source}: input {INPUT_NAME!r} must be uint8 [N, {size}, {size}, 1]. "
            f"Got {image.type} {list(image.shape)} instead."
        )
    if tuple(image.shape[1:]) != (size, size, 1):
        raise ContractError(
            f"{source}: input {INPUT_NAME!r} must be [N, {size}, {size}, 1] as the metadata "
            f"says. Got {list(image.shape)} instead."
        )
    by_name = {o.name: o for o in outputs}
    k = len(spec.class_names)
    for name, rank in ((PROBABILITIES, 2), (CAM, 4)):
        out = by_name.get(name)
        if out is None:
            raise ContractError(
                f"{source}: lacks output {name!r}. Got outputs {sorted(by_name)} instead."
            )
        if out.type != "tensor(float)" or len(out.shape) != rank:
            raise ContractError(
                f"{source}: output {name!r} must be float32 of rank {rank}. "
                f"Got {out.type} {list(out.shape)} instead."
            )
        if isinstance(out.shape[-1], int) and out.shape[-1] != k:
            raise ContractError(
                f"{source}: output {name!r} has {out.shape[-1]} classes, metadata lists {k}."
            )
    _check_optional_outputs(by_name, spec, source)


def _check_optional_outputs(
    by_name: Mapping[str, TensorInfo], spec: ModelSpec, source: str
) -> None:
    lesion = by_name.get(LESION)
    if (lesion is None) == spec.has_lesion:
        raise ContractError(
            f"{source}: the metadata's lesion stride ({spec.lesion_stride}) and the outputs "
            f"{sorted(by_name)} disagree: a model has a {LESION!r} output exactly when its "
            f"{KEY_LESION_STRIDE} is above 0."
        )
    if lesion is not None and (
        lesion.type != "tensor(float)" or len(lesion.shape) != 4 or lesion.shape[-1] != 1
    ):
        raise ContractError(
            f"{source}: output {LESION!r} must be float32 [N, h, w, 1]. "
            f"Got {lesion.type} {list(lesion.shape)} instead."
        )
    features = by_name.get(FEATURES)
    if features is not None and (features.type != "tensor(float)" or len(features.shape) != 2):
        raise ContractError(
            f"{source}: output {FEATURES!r} must be float32 [N, D]. "
            f"Got {features.type} {list(features.shape)} instead."
        )
