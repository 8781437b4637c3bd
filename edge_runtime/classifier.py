"""The Classifier task: files or arrays in, typed results out.

Decoding and resizing run in a thread pool (OpenCV releases the GIL) a few batches ahead of
inference; each batch is one contiguous uint8 array fed to onnxruntime.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edge_runtime.calibration import apply_temperature as _calibrate
from edge_runtime.contract import CAM, INPUT_NAME, PROBABILITIES, ModelSpec, Precision
from edge_runtime.decode import InputError, load_frames, to_gray_uint8
from edge_runtime.heatmap import cam_to_heatmap
from edge_runtime.preprocess import fit_to_square
from edge_runtime.recheck import needs_recheck
from edge_runtime.session import (
    LoadedModel,
    Provider,
    choose_providers,
    open_model,
    open_recheck_model,
)

Source = str | os.PathLike[str] | np.ndarray
MODELS_DIR = Path(__file__).parent / "models"


@dataclass(frozen=True)
class ClassifierOptions:
    """How to open and run a model. ``model_path`` None means the bundled model that suits the
    provider (:func:`default_precision`)."""

    model_path: str | os.PathLike[str] | None = None
    provider: Provider = Provider.AUTO
    threads: int | None = None
    batch_size: int = 8
    decode_workers: int = max(1, min(4, os.cpu_count() or 1))
    abstain_below: float | None = None  # None: the model's own threshold
    recheck: bool = True  # rerun in FP32 what an INT8 model is unsure of, if its metadata asks

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1. Got {self.batch_size} instead.")
        if self.decode_workers < 1:
            raise ValueError(f"decode_workers must be >= 1. Got {self.decode_workers} instead.")
        if self.abstain_below is not None and not 0.0 <= self.abstain_below <= 1.0:
            raise ValueError(f"abstain_below must be in [0, 1]. Got {self.abstain_below} instead.")


@dataclass(frozen=True)
class Timing:
    """Per-stage milliseconds for one result (batch stages shared equally within the batch)."""

    decode_ms: float = 0.0
    preprocess_ms: float = 0.0
    inference_ms: float = 0.0
    postprocess_ms: float = 0.0

    @property
    def total_ms(self) -> float:
        return self.decode_ms + self.preprocess_ms + self.inference_ms + self.postprocess_ms


@dataclass(frozen=True)
class Result:
    """One classified image (or DICOM frame), or the reason it could not be classified."""

    source: str
    label: str | None
    probabilities: Mapping[str, float]
    confidence: float | None
    abstained: bool
    error: str | None
    timing: Timing
    frame: int | None = None
    rechecked: bool = False  # INT8 was unsure; these are the FP32 model's answers
    heatmap: np.ndarray | None = field(default=None, repr=False, compare=False)
    image: np.ndarray | None = field(default=None, repr=False, compare=False)

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class _Item:
    source: str
    frame: int | None
    square: np.ndarray | None = None
    original: np.ndarray | None = None
    error: str | None = None
    decode_ms: float = 0.0
    preprocess_ms: float = 0.0


def default_model_path(precision: Precision | str = Precision.INT8) -> Path:
    """Path of the bundled default model of the given precision.

    Raises:
        FileNotFoundError: this installation carries no bundled model of that precision.
    """
    precision = Precision(precision)
    path = MODELS_DIR / f"default-{precision.value}.onnx"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no bundled {precision.value} model in this installation. "
            "Pass --model PATH to an exported model."
        )
    return path


def default_precision(provider_name: str) -> Precision:
    """The bundled model to run on an onnxruntime provider: FP32 on CUDA, INT8 elsewhere.

    onnxruntime's CUDA provider has no INT8 convolution kernels and runs the INT8 model's
    convolutions in float between (de)quantize steps: on an H200 (onnxruntime-gpu 1.31.1, batch
    1, two runs) the bundled INT8 model took 2.3-2.9 ms per scan and the FP32 model 1.0-1.1 ms.
    The CPU provider and TensorRT run INT8 as integer arithmetic.
    """
    return Precision.FP32 if provider_name == "CUDAExecutionProvider" else Precision.INT8


def resolve_model_path(
    model: str | os.PathLike[str] | None, provider: Provider = Provider.AUTO
) -> Path:
    """A model argument to a file: ``fp32``/``int8``/``fp16`` -> bundled; None -> the bundled
    model for the provider that ``provider`` tries first (:func:`default_precision`)."""
    if model is None:
        return default_model_path(default_precision(choose_providers(provider)[0]))
    if str(model) in {p.value for p in Precision} and not Path(model).exists():
        return default_model_path(str(model))
    return Path(model)


class Classifier:
    """Classifies breast-ultrasound scans with an edge-classify ONNX model.

    The model takes uint8 ``[N, S, S, 1]`` grayscale (``S`` from its metadata) and returns softmax
    ``probabilities`` ``[N, K]`` and class activation maps ``cam``. Use as a context manager or
    call :meth:`close`.

    Example:
        >>> with Classifier.from_path("model-int8.onnx") as clf:  # doctest: +SKIP
        ...     for result in clf.classify(["scan1.png", "scan2.dcm"]):
        ...         print(result.source, result.label, result.confidence)
    """

    def __init__(
        self, model: LoadedModel, options: ClassifierOptions, recheck: LoadedModel | None = None
    ) -> None:
        self._model = model
        self._recheck = recheck
        self._options = options
        self._pool = ThreadPoolExecutor(options.decode_workers, thread_name_prefix="decode")
        self._abstain_below = (
            model.spec.abstain_threshold if options.abstain_below is None else options.abstain_below
        )

    @classmethod
    def from_options(cls, options: ClassifierOptions) -> Classifier:
        """Open the model that ``options`` names and check its contract."""

        def open_(path: Path) -> LoadedModel:
            return open_model(path, provider=options.provider, threads=options.threads)

        model = open_(resolve_model_path(options.model_path, options.provider))
        fitting = default_precision(model.providers[0])
        if options.model_path is None and model.spec.precision is not fitting:
            model = open_(default_model_path(fitting))  # its first provider failed to start
        recheck = None
        if options.recheck:
            recheck = open_recheck_model(model, provider=options.provider, threads=options.threads)
        return cls(model, options, recheck)

    @classmethod
    def from_path(cls, path: str | os.PathLike[str], **options) -> Classifier:
        """Open an ONNX model file; keyword arguments are :class:`ClassifierOptions` fields."""
        return cls.from_options(ClassifierOptions(model_path=path, **options))

    @classmethod
    def default(cls, precision: Precision | str = Precision.INT8, **options) -> Classifier:
        """Open the bundled default model (INT8 unless ``precision`` says otherwise)."""
        return cls.from_path(default_model_path(precision), **options)

    @property
    def spec(self) -> ModelSpec:
        return self._model.spec

    @property
    def model_path(self) -> Path:
        return self._model.path

    @property
    def providers(self) -> tuple[str, ...]:
        return self._model.providers

    @property
    def abstain_below(self) -> float:
        return self._abstain_below

    @property
    def recheck_model_path(self) -> Path | None:
        """The FP32 model that reruns the scans this INT8 model is unsure of, if any."""
        return None if self._recheck is None else self._recheck.path

    def classify(self, sources: Iterable[Source], *, heatmaps: bool = False) -> list[Result]:
        """Classify files (paths) or 2-D / BGR arrays; one result per image or DICOM frame.

        A bad input gives a result with ``error`` set; it never stops the others.
        """
        return list(self.iter_classify(sources, heatmaps=heatmaps))

    def iter_classify(
        self, sources: Iterable[Source], *, heatmaps: bool = False
    ) -> Iterator[Result]:
        """Like :meth:`classify`, yielding results in input order as each batch completes.

        Failed inputs wait in the batch beside good ones, so the order is kept.
        """
        pending: list[_Item] = []
        for items in self._decoded(sources, keep_original=heatmaps):
            pending.extend(items)
            if sum(item.error is None for item in pending) >= self._options.batch_size:
                yield from self._finish(pending, heatmaps)
                pending = []
        if pending:
            yield from self._finish(pending, heatmaps)

    def _finish(self, pending: list[_Item], heatmaps: bool) -> list[Result]:
        good = [item for item in pending if item.error is None]
        done = iter(self._run_batch(good, heatmaps) if good else [])
        return [next(done) if item.error is None else self._failure(item) for item in pending]

    def run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Run the model on a uint8 ``[N, S, S, 1]`` batch; returns uncalibrated (probabilities,
        cam), with the FP32 model's rows where it rechecked INT8 (:attr:`recheck_model_path`)."""
        probabilities, cam, _ = self._run_rechecked(images)
        return probabilities, cam

    def _run_rechecked(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        probabilities, cam = self._model.session.run([PROBABILITIES, CAM], {INPUT_NAME: images})
        if self._recheck is None:
            return probabilities, cam, np.zeros(len(images), dtype=bool)
        redo = needs_recheck(probabilities, self._model.spec.recheck_margin)
        if redo.any():
            outputs = self._recheck.session.run([PROBABILITIES, CAM], {INPUT_NAME: images[redo]})
            probabilities[redo], cam[redo] = outputs
        return probabilities, cam, redo

    def close(self) -> None:
        """Stop the decode threads. The session is released with the object."""
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> Classifier:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _decoded(self, sources: Iterable[Source], keep_original: bool) -> Iterator[list[_Item]]:
        window: deque[Future[list[_Item]]] = deque()
        ahead = self._options.batch_size * 2 + self._options.decode_workers
        for source in sources:
            window.append(self._pool.submit(self._decode, source, keep_original))
            if len(window) >= ahead:
                yield window.popleft().result()
        while window:
            yield window.popleft().result()

    def _decode(self, source: Source, keep_original: bool) -> list[_Item]:
        name = "<array>" if isinstance(source, np.ndarray) else str(source)
        start = time.perf_counter()
        try:
            if isinstance(source, np.ndarray):
                frames = [to_gray_uint8(source, name)]
            else:
                frames = load_frames(source)
            return self._squares(name, frames, keep_original, _ms_since(start) / len(frames))
        except InputError as exc:
            return [_Item(name, None, error=exc.reason, decode_ms=_ms_since(start))]
        except Exception as exc:  # a decoder bug must cost one input, never the batch
            reason = f"could not be decoded ({type(exc).__name__}: {exc})"
            return [_Item(name, None, error=reason, decode_ms=_ms_since(start))]

    def _squares(
        self, name: str, frames: list[np.ndarray], keep_original: bool, decode_ms: float
    ) -> list[_Item]:
        spec = self._model.spec
        items = []
        for index, frame in enumerate(frames):
            begin = time.perf_counter()
            square = fit_to_square(frame, spec.input_size, spec.resize_policy)
            items.append(
                _Item(
                    name,
                    index if len(frames) > 1 else None,
                    square=square,
                    original=frame if keep_original else None,
                    decode_ms=decode_ms,
                    preprocess_ms=_ms_since(begin),
                )
            )
        return items

    def _run_batch(self, batch: Sequence[_Item], heatmaps: bool) -> list[Result]:
        start = time.perf_counter()
        images = np.stack([item.square for item in batch])[..., None]
        stack_ms = _ms_since(start)
        start = time.perf_counter()
        probabilities, cam, rechecked = self._run_rechecked(images)
        inference_ms = _ms_since(start) / len(batch)
        start = time.perf_counter()
        probabilities = _calibrate(probabilities, self._model.spec.temperature)
        names = self._model.spec.class_names
        results = []
        for row, item in enumerate(batch):
            top = int(np.argmax(probabilities[row]))
            confidence = float(probabilities[row, top])
            heat = None
            if heatmaps and item.original is not None:
                spec = self._model.spec
                heat = cam_to_heatmap(
                    cam[row, :, :, top], item.original.shape, spec.input_size, spec.resize_policy
                )
            results.append(
                Result(
                    source=item.source,
                    label=names[top],
                    probabilities=dict(zip(names, map(float, probabilities[row]), strict=True)),
                    confidence=confidence,
                    abstained=confidence < self._abstain_below,
                    error=None,
                    timing=Timing(
                        item.decode_ms,
                        item.preprocess_ms + stack_ms / len(batch),
                        inference_ms,
                        0.0,
                    ),
                    frame=item.frame,
                    rechecked=bool(rechecked[row]),
                    heatmap=heat,
                    image=item.original if heatmaps else None,
                )
            )
        post_ms = _ms_since(start) / len(batch)
        return [_with_postprocess(r, post_ms) for r in results]

    def _failure(self, item: _Item) -> Result:
        return Result(
            source=item.source,
            label=None,
            probabilities={},
            confidence=None,
            abstained=False,
            error=item.error,
            timing=Timing(decode_ms=item.decode_ms),
            frame=item.frame,
        )


def _with_postprocess(result: Result, post_ms: float) -> Result:
    t = result.timing
    timing = Timing(t.decode_ms, t.preprocess_ms, t.inference_ms, post_ms)
    return Result(**{**result.__dict__, "timing": timing})


def _ms_since(start: float) -> float:
    return (time.perf_counter() - start) * 1000.0
