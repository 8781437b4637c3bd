"""Measure INT8 variants of one FP32 model: latency and agreement, to choose by numbers.

For each variant (activation/weight type x calibration method) this quantizes the FP32 model
exactly as ``edge-export`` does, then reports batch-1 single-thread CPU latency (median over
many runs, variants interleaved so that background load hits all of them alike), top-1
agreement with FP32 (and accuracy when the images sit in ``<class>/`` folders named as the
model's classes), and how many convolutions onnxruntime runs as integer kernels.

examples:
  1. the default variants on a model, calibrating on training scans, judging on others:
       python -m export.measure_quant runs/lite0/export/model-fp32.onnx \\
           --calibration data/train --images data/val
  2. only two variants, more timing runs, results also as JSON:
       python -m export.measure_quant model-fp32.onnx --calibration cal --images val \\
           --variants U8S8-minmax S8S8-minmax --runs 500 --json quant.json
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TextIO

import numpy as np
import onnxruntime as ort

from edge_runtime.io.decode import InputError, load_gray
from edge_runtime.io.preprocess import make_batch
from edge_runtime.model.contract import INPUT_NAME, PROBABILITIES, ModelSpec, ResizePolicy
from edge_runtime.model.session import batch_probabilities
from export.diagnose import ConvCount, count_convs
from export.quantize import Calibration, IntType, QuantConfig, quantize_int8

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
DEFAULT_VARIANTS = (
    "U8S8-minmax",
    "S8S8-minmax",
    "U8S8-percentile",
    "U8S8-entropy",
    "S8S8-percentile",
    "S8S8-entropy",
)
_TYPES = {"U8": IntType.U8, "S8": IntType.S8}


@dataclass(frozen=True)
class VariantResult:
    """One model's measurements. ``agreement`` and ``accuracy`` are fractions."""

    variant: str
    latency_ms: float
    latency_p90_ms: float
    agreement: float
    accuracy: float | None
    int8_convs: int
    fp32_convs: int
    quantize_s: float


def parse_variant(text: str, *, base: QuantConfig | None = None) -> QuantConfig:
    """``"U8S8-minmax"`` -> a :class:`QuantConfig` (activations, weights, calibration).

    Raises:
        ValueError: the text is not ``<U8|S8><U8|S8>-<minmax|percentile|entropy>``.
    """
    base = base or QuantConfig()
    types, _, method = text.partition("-")
    try:
        return QuantConfig(
            activations=_TYPES[types[:2].upper()],
            weights=_TYPES[types[2:].upper()],
            per_channel=base.per_channel,
            calibration=Calibration(method.lower()),
            max_calibration_images=base.max_calibration_images,
        )
    except (KeyError, ValueError):
        raise ValueError(
            f"A variant must look like 'U8S8-minmax' (types U8|S8, calibration "
            f"{'|'.join(c.value for c in Calibration)}). Got {text!r} instead."
        ) from None


def load_folder_images(
    sources: Sequence[Path], size: int, policy: ResizePolicy
) -> tuple[np.ndarray, list[str]]:
    """Decode image files (folders searched recursively, sorted) into a uint8 batch.

    Returns:
        ``(images, parent folder names)``; unreadable files are skipped with a warning.

    Raises:
        FileNotFoundError: a source does not exist, or no image was found.
    """
    files: list[Path] = []
    for source in sources:
        if source.is_dir():
            files += sorted(p for p in source.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        elif source.is_file():
            files.append(source)
        else:
            raise FileNotFoundError(f"{source}: no such file or folder")
    grays, folders = [], []
    for path in files:
        if "_mask" in path.stem:
            continue  # BUSI keeps lesion masks beside the scans
        try:
            grays.append(load_gray(path))
            folders.append(path.parent.name)
        except InputError as exc:
            log.warning("%s: skipped: %s", path, exc.reason)
    if not grays:
        raise FileNotFoundError(f"{', '.join(map(str, sources))}: no readable images found")
    return make_batch(grays, size, policy), folders


def measure(
    fp32_path: Path,
    variants: Sequence[QuantConfig],
    calibration: np.ndarray,
    images: np.ndarray,
    *,
    labels: np.ndarray | None = None,
    runs: int = 200,
    work_dir: Path,
) -> list[VariantResult]:
    """Quantize ``fp32_path`` once per variant into ``work_dir`` and measure every model.

    Args:
        fp32_path: the FP32 model (contract input ``image``, output ``probabilities``).
        variants: the INT8 settings to compare.
        calibration: uint8 calibration images (training images).
        images: uint8 images to judge agreement on (not the calibration images).
        labels: class indices of ``images``, for accuracy; optional.
        runs: timed batch-1 runs per model.
        work_dir: where the INT8 models are written.

    Returns:
        FP32 first, then one result per variant.
    """
    paths, quantize_s = {"FP32": fp32_path}, {"FP32": 0.0}
    for config in variants:
        start = time.perf_counter()
        paths[config.label] = quantize_int8(
            fp32_path, work_dir / f"{config.label}.onnx", calibration, config
        )
        quantize_s[config.label] = time.perf_counter() - start
        log.info("%s quantized in %.1fs", config.label, quantize_s[config.label])
    sessions = {name: _session(path) for name, path in paths.items()}
    probabilities = {name: _predict(s, images) for name, s in sessions.items()}
    latency = _interleaved_latency(sessions, images, runs)
    reference = probabilities["FP32"].argmax(1)
    results = []
    for name, probs in probabilities.items():
        top1 = probs.argmax(1)
        convs: ConvCount = count_convs(paths[name])
        results.append(
            VariantResult(
                variant=name,
                latency_ms=float(np.median(latency[name])),
                latency_p90_ms=float(np.percentile(latency[name], 90)),
                agreement=float(np.mean(top1 == reference)),
                accuracy=None if labels is None else float(np.mean(top1 == labels)),
                int8_convs=convs.int8,
                fp32_convs=convs.fp32,
                quantize_s=quantize_s[name],
            )
        )
    return results


def format_table(results: Sequence[VariantResult]) -> str:
    """A Markdown table, FP32 first, with speed-up relative to FP32."""
    base = results[0].latency_ms
    lines = [
        "| variant | median ms | p90 ms | speed-up | top-1 agreement | accuracy | int8/fp32 convs"
        " | quantize s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        accuracy = "-" if r.accuracy is None else f"{r.accuracy:.4f}"
        lines.append(
            f"| {r.variant} | {r.latency_ms:.2f} | {r.latency_p90_ms:.2f} | "
            f"{base / r.latency_ms:.2f}x | {r.agreement:.4f} | {accuracy} | "
            f"{r.int8_convs}/{r.fp32_convs} | {r.quantize_s:.1f} |"
        )
    return "\n".join(lines) + "\n"


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _predict(session: ort.InferenceSession, images: np.ndarray) -> np.ndarray:
    return batch_probabilities(session, images, batch_size=16)


def _interleaved_latency(
    sessions: dict[str, ort.InferenceSession], images: np.ndarray, runs: int
) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for session in sessions.values():  # warm-up
        for i in range(5):
            session.run([PROBABILITIES], {INPUT_NAME: images[i % len(images)][None]})
    for i in range(runs):
        feed = {INPUT_NAME: images[i % len(images)][None]}
        for name, session in sessions.items():
            start = time.perf_counter()
            session.run([PROBABILITIES], feed)
            times[name].append((time.perf_counter() - start) * 1e3)
    return times


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m export.measure_quant``."""
    parser = argparse.ArgumentParser(
        prog="python -m export.measure_quant",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__[__doc__.index("examples:") :],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", type=Path, help="the FP32 .onnx model")
    parser.add_argument(
        "--calibration", type=Path, nargs="+", required=True, help="training images or folders"
    )
    parser.add_argument(
        "--images", type=Path, nargs="+", required=True, help="held-out images or folders"
    )
    parser.add_argument(
        "--variants", nargs="+", default=list(DEFAULT_VARIANTS), help="e.g. U8S8-minmax"
    )
    parser.add_argument("--runs", type=int, default=200, help="timed runs per model")
    parser.add_argument(
        "--calibration-images", type=int, default=128, help="calibration images used, at most"
    )
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    return parser


def main(argv: Sequence[str] | None = None, *, stdout: TextIO | None = None) -> int:
    """Entry point: prints the Markdown table; returns 0, or 2 on bad input."""
    stdout = stdout or sys.stdout
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    try:
        base = QuantConfig(max_calibration_images=args.calibration_images)
        variants = [parse_variant(v, base=base) for v in args.variants]
        meta = ort.InferenceSession(str(args.model), providers=["CPUExecutionProvider"])
        size = int(meta.get_inputs()[0].shape[1])
        custom = meta.get_modelmeta().custom_metadata_map
        spec = ModelSpec.from_metadata(custom, source=str(args.model)) if custom else None
        policy = spec.resize_policy if spec else ResizePolicy.LETTERBOX
        calibration, _ = load_folder_images(args.calibration, size, policy)
        images, folders = load_folder_images(args.images, size, policy)
    except (OSError, ValueError) as exc:
        print(f"measure_quant: error: {exc}", file=sys.stderr)
        return 2
    labels = None
    if spec and all(f in spec.class_names for f in folders):
        labels = np.array([spec.class_names.index(f) for f in folders])
    calibration = calibration[
        np.linspace(0, len(calibration) - 1, min(len(calibration), args.calibration_images))
        .round()
        .astype(int)
    ]
    log.info("%d calibration images, %d images to judge", len(calibration), len(images))
    with tempfile.TemporaryDirectory(prefix=".measure-") as tmp:
        results = measure(
            args.model,
            variants,
            calibration,
            images,
            labels=labels,
            runs=args.runs,
            work_dir=Path(tmp),
        )
    stdout.write(
        f"{args.model}: batch 1, 1 thread, median of {args.runs} interleaved runs, "
        f"{len(images)} images judged, onnxruntime {ort.__version__}\n\n"
    )
    stdout.write(format_table(results))
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
