"""Where an INT8 model loses accuracy, and which convolutions onnxruntime really runs in INT8.

``rank_quantization_error`` runs the float and the QDQ model side by side with every
intermediate tensor exposed (onnxruntime's ``qdq_loss_debug``) and ranks tensors by their
signal-to-quantization-noise ratio (SQNR, dB; lower is worse). ``count_convs`` dumps the graph
onnxruntime actually executes and counts integer versus float convolutions.
"""

from __future__ import annotations

import logging
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import CalibrationDataReader
from onnxruntime.quantization.qdq_loss_debug import (
    collect_activations,
    compute_activation_error,
    create_activation_matching,
    create_weight_matching,
    modify_model_output_intermediate_tensors,
)

from edge_runtime.model.contract import INPUT_NAME

log = logging.getLogger(__name__)

INTEGER_CONVS = frozenset({"QLinearConv", "ConvInteger", "NhwcQLinearConv"})
FLOAT_CONVS = frozenset({"Conv", "FusedConv"})
EXACT_DB = 60.0  # above this SQNR a tensor is as good as exact; its "drop" means nothing


@dataclass(frozen=True)
class TensorError:
    """Quantization error of one activation tensor, as SQNR in dB (higher is better).

    Attributes:
        name: tensor name in the (pre-processed) float model.
        producer: ``op_type`` and name of the node that computes it.
        qdq_sqnr_db: the tensor before vs after its own quantize/dequantize pair in the INT8
            model (the noise this tensor's scale adds).
        model_sqnr_db: the float model's tensor vs the INT8 model's (all noise up to here);
            None when the float model has no tensor of that name.
    """

    name: str
    producer: str
    qdq_sqnr_db: float
    model_sqnr_db: float | None
    drop_db: float | None = None

    def summary(self) -> str:
        """One line for a report."""
        model = "n/a" if self.model_sqnr_db is None else f"{self.model_sqnr_db:6.1f} dB"
        drop = "n/a" if self.drop_db is None else f"{self.drop_db:5.1f} dB"
        return (
            f"{self.name} ({self.producer}): float vs INT8 model {model}, lost here {drop} "
            f"(SQNR at its own QDQ {self.qdq_sqnr_db:.1f} dB; low for ReLU6 outputs, whose clip "
            "is folded into the quantization range)"
        )


@dataclass(frozen=True)
class ConvCount:
    """Convolutions in the graph onnxruntime executes after its optimizations."""

    int8: int
    fp32: int
    op_types: dict[str, int]

    @property
    def total(self) -> int:
        return self.int8 + self.fp32


class _Images(CalibrationDataReader):
    def __init__(self, images: np.ndarray) -> None:
        self._batches = iter(images[i : i + 1] for i in range(len(images)))

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        return None if batch is None else {INPUT_NAME: batch}


def rank_quantization_error(
    float_path: Path, qdq_path: Path, images: np.ndarray, *, top: int = 5
) -> tuple[list[TensorError], list[tuple[str, float]]]:
    """Rank the INT8 model's activations and weights by quantization error, worst first.

    Args:
        float_path: the float model the QDQ model was quantized from: the *pre-processed* one
            (``export.quantize.prepare_for_quantization``), so that tensor names match.
        qdq_path: the QDQ INT8 model.
        images: a few uint8 ``[N,S,S,1]`` held-out images (each is run separately).
        top: how many of each to return.

    Returns:
        ``(activations, weights)``: the ``top`` activations whose producing node loses the
        most float-vs-INT8 SQNR (output vs its best input), and the ``top``
        ``(weight name, SQNR dB)`` pairs with the lowest SQNR.
    """
    with tempfile.TemporaryDirectory(prefix=".diagnose-") as tmp:
        float_aug, qdq_aug = Path(tmp) / "float.onnx", Path(tmp) / "qdq.onnx"
        modify_model_output_intermediate_tensors(str(float_path), str(float_aug))
        modify_model_output_intermediate_tensors(str(qdq_path), str(qdq_aug))
        float_acts = collect_activations(str(float_aug), _Images(images))
        qdq_acts = collect_activations(str(qdq_aug), _Images(images))
    matched = create_activation_matching(qdq_acts, float_acts)
    errors = compute_activation_error(matched)
    nodes = {
        out: node
        for node in onnx.load(str(float_path), load_external_data=False).graph.node
        for out in node.output
    }
    model_sqnr = {name: err.get("xmodel_err") for name, err in errors.items()}
    found = [
        TensorError(
            name=name,
            producer=f"{nodes[name].op_type} {nodes[name].name}".strip()
            if name in nodes
            else "graph input",
            qdq_sqnr_db=err["qdq_err"],
            model_sqnr_db=model_sqnr[name],
            drop_db=_drop(name, nodes, model_sqnr),
        )
        for name, err in errors.items()
    ]
    ranked = sorted(found, key=lambda e: -(e.drop_db or 0.0))
    weights = {
        name: _sqnr_db(pair["float"], pair["dequantized"])
        for name, pair in create_weight_matching(str(float_path), str(qdq_path)).items()
    }
    worst_weights = sorted(weights.items(), key=lambda item: item[1])[:top]
    return ranked[:top], worst_weights


def _drop(name: str, nodes: dict, model_sqnr: dict) -> float | None:
    """How much the float-vs-INT8 SQNR falls from a node's best-measured input to its output:
    the error that node adds, rather than all the error accumulated up to it."""
    own = model_sqnr.get(name)
    node = nodes.get(name)
    inputs = [model_sqnr.get(i) for i in node.input] if node is not None else []
    inputs = [v for v in inputs if v is not None]
    if own is None or own >= EXACT_DB or not inputs:
        return None
    return max(inputs) - own


def _sqnr_db(reference: np.ndarray, candidate: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio in dB (scalars too, which onnxruntime's helper
    rejects)."""
    reference = np.atleast_1d(np.asarray(reference, np.float64))
    noise = reference - np.atleast_1d(np.asarray(candidate, np.float64))
    eps = np.finfo(np.float64).eps
    return float(
        20 * np.log10(max(np.linalg.norm(reference), eps) / max(np.linalg.norm(noise), eps))
    )


def count_convs(path: Path) -> ConvCount:
    """Count integer and float convolutions in the graph the CPU provider runs.

    Dumps the optimized graph (``SessionOptions.optimized_model_filepath``, all optimizations
    on) and counts ``QLinearConv``/``ConvInteger`` against ``Conv``/``FusedConv`` nodes, in any
    domain. A QDQ model whose convolutions were not fused into integer kernels shows them as float.
    """
    with tempfile.TemporaryDirectory(prefix=".convs-") as tmp:
        dump = Path(tmp) / "optimized.onnx"
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.optimized_model_filepath = str(dump)
        options.intra_op_num_threads = 1
        options.log_severity_level = 3
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        ops = Counter(node.op_type for node in onnx.load(str(dump)).graph.node)
    convs = {op: n for op, n in ops.items() if op in INTEGER_CONVS | FLOAT_CONVS}
    return ConvCount(
        int8=sum(n for op, n in convs.items() if op in INTEGER_CONVS),
        fp32=sum(n for op, n in convs.items() if op in FLOAT_CONVS),
        op_types=dict(sorted(convs.items())),
    )
