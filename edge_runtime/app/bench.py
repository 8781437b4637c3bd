"""Latency and throughput of a model on this machine, stage by stage.

For each batch size, every timed run preprocesses that many scans (letterbox / stretch into the
model's square, stacked into one uint8 batch), runs the session, and post-processes (arg-max and
confidence), timing the three stages separately. An INT8 model's FP32 recheck runs within the
inference, and the report counts the batch's images it reran. Reused by ``edge-classify bench``
and ``benchmarks/``.
"""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from edge_runtime.classifier import Classifier
from edge_runtime.io.decode import InputError, load_frames
from edge_runtime.io.preprocess import fit_to_square
from edge_runtime.postprocess.recheck import rerun_rule

SYNTHETIC_SHAPE = (480, 640)  # a typical ultrasound frame, height x width


@dataclass(frozen=True)
class BatchTiming:
    """Milliseconds per batch (medians and 90th percentiles over the timed runs)."""

    batch_size: int
    runs: int
    median_ms: float  # inference
    p90_ms: float  # inference
    images_per_s: float  # batch_size / inference median
    preprocess_median_ms: float
    postprocess_median_ms: float
    end_to_end_median_ms: float  # preprocess + inference + postprocess, per run
    end_to_end_images_per_s: float
    rechecked: int  # of the batch's images, how many the FP32 recheck model reran in each run


@dataclass(frozen=True)
class BenchReport:
    """One benchmark: where it ran and the timings per batch size."""

    model_path: str
    precision: str
    input_size: int
    provider: str  # the provider the session actually used
    threads: int | None
    onnxruntime_version: str
    cpu: str
    images: str  # "synthetic HxW" or the folder the scans came from
    batches: tuple[BatchTiming, ...]
    recheck_model: str | None = None  # the FP32 model that reruns scans INT8 is unsure of
    recheck_margin: float = 0.0  # the top-1 rule's margin; recheck_rule has every rule
    recheck_rule: str = ""  # edge_runtime.postprocess.recheck.rerun_rule, in words

    def to_dict(self) -> dict:
        return asdict(self)


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo, else :func:`platform.processor`, else the machine."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def synthetic_scans(count: int, shape: tuple[int, int] = SYNTHETIC_SHAPE, seed: int = 0):
    """``count`` random uint8 grayscale frames (content does not change the timing)."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, shape, dtype=np.uint8) for _ in range(count)]


def benchmark(
    classifier: Classifier,
    *,
    batch_sizes: Sequence[int] = (1, 8),
    runs: int = 50,
    warmup: int = 5,
    scans: Sequence[np.ndarray] | None = None,
    scans_label: str | None = None,
    threads: int | None = None,
) -> BenchReport:
    """Time ``classifier``'s model at each batch size.

    Args:
        classifier: an open classifier (its session and model contract are used).
        batch_sizes: batch sizes to time, each >= 1.
        runs: timed runs per batch size.
        warmup: untimed runs per batch size first.
        scans: 2-D uint8 frames to feed, cycled (default: synthetic 480 x 640).
        scans_label: how the report names the scans (default: "synthetic HxW").
        threads: the intra-op thread count the session was opened with, for the report.

    Returns:
        The report; timings in milliseconds per batch.

    Raises:
        ValueError: a batch size, ``runs`` or ``warmup`` out of range, or no scans.
    """
    if not batch_sizes or any(b < 1 for b in batch_sizes):
        raise ValueError(f"batch sizes must be >= 1. Got {list(batch_sizes)} instead.")
    if runs < 1 or warmup < 0:
        raise ValueError(f"runs must be >= 1 and warmup >= 0. Got {runs}, {warmup} instead.")
    if scans is None:
        scans = synthetic_scans(max(batch_sizes))
        scans_label = scans_label or f"synthetic {SYNTHETIC_SHAPE[0]}x{SYNTHETIC_SHAPE[1]}"
    if not scans:
        raise ValueError("no scans to benchmark with. Pass a folder with images, or none.")
    spec = classifier.spec
    timings = []
    for batch_size in batch_sizes:
        batch = [scans[i % len(scans)] for i in range(batch_size)]
        pre, inf, post = [], [], []
        for index in range(warmup + runs):
            t0 = time.perf_counter()
            images = np.stack(
                [fit_to_square(s, spec.input_size, spec.resize_policy) for s in batch]
            )
            images = np.ascontiguousarray(images[..., None])
            t1 = time.perf_counter()
            probabilities, _cam = classifier.run_raw(images)
            t2 = time.perf_counter()
            top = probabilities.argmax(axis=1)
            _confidence = probabilities[np.arange(len(top)), top]
            t3 = time.perf_counter()
            if index >= warmup:
                pre.append((t1 - t0) * 1e3)
                inf.append((t2 - t1) * 1e3)
                post.append((t3 - t2) * 1e3)
        total = [a + b + c for a, b, c in zip(pre, inf, post, strict=True)]
        median = statistics.median(inf)
        total_median = statistics.median(total)
        timings.append(
            BatchTiming(
                batch_size=batch_size,
                runs=runs,
                median_ms=round(median, 4),
                p90_ms=round(_percentile(inf, 90), 4),
                images_per_s=round(batch_size * 1e3 / median, 2) if median > 0 else float("inf"),
                preprocess_median_ms=round(statistics.median(pre), 4),
                postprocess_median_ms=round(statistics.median(post), 4),
                end_to_end_median_ms=round(total_median, 4),
                end_to_end_images_per_s=round(batch_size * 1e3 / total_median, 2)
                if total_median > 0
                else float("inf"),
                rechecked=int(classifier.call_squares(images).rechecked.sum()),
            )
        )
    recheck = classifier.recheck_model_path
    return BenchReport(
        model_path=str(classifier.model_path),
        precision=spec.precision.value,
        input_size=spec.input_size,
        provider=classifier.providers[0],
        threads=threads,
        onnxruntime_version=ort.__version__,
        cpu=cpu_name(),
        images=scans_label or f"{len(scans)} scans",
        batches=tuple(timings),
        recheck_model=str(recheck) if recheck else None,
        recheck_margin=spec.recheck_margin if recheck else 0.0,
        recheck_rule=rerun_rule(spec) if recheck else "",
    )


def format_table(report: BenchReport) -> str:
    """The report as a fixed-width text table."""
    head = [
        f"model     {report.model_path} ({report.precision}, input {report.input_size}x"
        f"{report.input_size})",
        f"provider  {report.provider}, threads {report.threads or 'default'}, "
        f"onnxruntime {report.onnxruntime_version}",
        f"cpu       {report.cpu}",
        f"images    {report.images}",
        *(
            [
                f"recheck   scans with {report.recheck_rule} rerun by {report.recheck_model} "
                "(the rechecked column: how many of each batch; --no-recheck: none)"
            ]
            if report.recheck_model
            else []
        ),
        "",
        f"{'batch':>5} {'runs':>5} {'median ms':>10} {'p90 ms':>9} {'img/s':>9} "
        f"{'pre ms':>8} {'post ms':>8} {'e2e img/s':>10} {'rechecked':>9}",
    ]
    rows = [
        f"{t.batch_size:>5} {t.runs:>5} {t.median_ms:>10.3f} {t.p90_ms:>9.3f} "
        f"{t.images_per_s:>9.1f} {t.preprocess_median_ms:>8.3f} {t.postprocess_median_ms:>8.3f} "
        f"{t.end_to_end_images_per_s:>10.1f} {t.rechecked:>9}"
        for t in report.batches
    ]
    return "\n".join(head + rows) + "\n"


def load_scans(files: Sequence[Path], limit: int = 64) -> list[np.ndarray]:
    """Decode up to ``limit`` frames from ``files`` (unreadable files are skipped)."""
    scans: list[np.ndarray] = []
    for path in files:
        try:
            scans.extend(load_frames(path))
        except InputError:
            continue
        if len(scans) >= limit:
            break
    return scans[:limit]


def _percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))
