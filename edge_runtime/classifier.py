"""The Classifier task: files or arrays in, typed results out.

Reading (decoding, the input check, fitting into the model's square) is
:class:`~edge_runtime.io.reader.ScanReader`'s, in a thread pool a few batches ahead of inference,
memory bounded by ``batch_size`` whatever a file holds. Each batch is one contiguous uint8 array
fed to onnxruntime, on one inference thread each, up to one batch per core at once
(``ClassifierOptions.inference_workers``): batches side by side cost less CPU than threads inside
one batch (docs/benchmarks.md).
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar, Literal, NamedTuple, TypeAlias

import numpy as np

from edge_runtime.io.decode import display_path
from edge_runtime.io.reader import DecodedItem, ScanReader, Source
from edge_runtime.model.contract import (
    CAM,
    FEATURES,
    INPUT_NAME,
    LESION,
    PROBABILITIES,
    ModelSpec,
    Precision,
)
from edge_runtime.model.cpu import int8_saturates
from edge_runtime.model.session import (
    LazyModel,
    LoadedModel,
    Provider,
    choose_providers,
    open_model,
    open_recheck_model,
)
from edge_runtime.postprocess.calibration import apply_temperature as _calibrate
from edge_runtime.postprocess.decision import (
    MALIGNANT,
    decide,
    lesion_verdict,
    unfamiliar_scores,
)
from edge_runtime.postprocess.heatmap import cam_to_heatmap, lesion_heatmap
from edge_runtime.postprocess.lesion import (
    Lesion,
    find_lesion,
    in_frame,
    lesion_peak,
    require_lesion_output,
)
from edge_runtime.postprocess.recheck import near_a_call

MODELS_DIR = Path(__file__).parent / "models"
log = logging.getLogger(__name__)


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, else the machine's count)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


@dataclass(frozen=True)
class ClassifierOptions:
    """How to open and run a model, in three concerns (MediaPipe's loading vs task options):

    - loading: ``model_path`` (None: the bundled model that suits the provider,
      :func:`default_precision`), ``provider``, ``threads``, ``recheck``;
    - scheduling: ``batch_size``, ``decode_workers``, ``inference_workers``;
    - decision policy: ``abstain_below``, ``malignant_threshold``, ``check_input`` (None: the
      model's own rule, from its metadata).

    ``threads`` are onnxruntime's intra-op threads for one batch (None: 1);
    ``inference_workers`` how many batches run at once, each on its own thread (None: as many as
    ``decode_workers`` and the cores left after ``threads`` allow, at least 1).
    """

    model_path: str | os.PathLike[str] | None = None
    provider: Provider = Provider.AUTO
    threads: int | None = None
    batch_size: int = 8
    decode_workers: int = field(default_factory=lambda: min(8, usable_cores()))
    inference_workers: int | None = None
    abstain_below: float | None = None  # None: the model's own threshold
    # call malignant when P(malignant) >= this; None: the model's own operating point (0: top-1)
    malignant_threshold: float | None = None
    recheck: bool = True  # rerun in FP32 what an INT8 model is unsure of, if its metadata asks
    # abstain on frames that are not ultrasound scans (edge_runtime.io.scan_check): blank, noise...
    check_input: bool = True

    @property
    def batches_at_once(self) -> int:
        """``inference_workers``, or what None stands for on this machine."""
        if self.inference_workers is not None:
            return self.inference_workers
        return max(1, min(self.decode_workers, usable_cores() // (self.threads or 1)))

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1. Got {self.batch_size} instead.")
        if self.decode_workers < 1:
            raise ValueError(f"decode_workers must be >= 1. Got {self.decode_workers} instead.")
        if self.inference_workers is not None and self.inference_workers < 1:
            raise ValueError(
                f"inference_workers must be >= 1 or None. Got {self.inference_workers} instead."
            )
        if self.abstain_below is not None and not 0.0 <= self.abstain_below <= 1.0:
            raise ValueError(f"abstain_below must be in [0, 1]. Got {self.abstain_below} instead.")
        if self.malignant_threshold is not None and not 0.0 <= self.malignant_threshold < 1.0:
            raise ValueError(
                f"malignant_threshold must be in [0, 1). Got {self.malignant_threshold} instead."
            )


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


@dataclass(frozen=True, kw_only=True)
class Classification:
    """One classified image (or DICOM frame, or TIFF page).

    ``source``, ``frame`` and ``timing`` are shared with :class:`Failure`; ``ok`` (True) and
    ``error`` (None) tell the two apart (or ``isinstance``).

    Attributes:
        source: the input's path (``"<array>"`` for an array).
        label: the call (top-1, or the model's malignant operating point or lesion rule).
        probabilities: class name -> calibrated probability, summing to 1.
        confidence: the called class's probability.
        abstained: a flag for review, with its ``abstain_reason``: not an ultrasound scan
            (:mod:`edge_runtime.io.scan_check`), ``unfamiliar``, or a confidence below the abstain
            threshold (never for a malignant call: at the operating point its confidence may be
            P(malignant) 0.15, and an abstained frame never decides a cine's finding). The
            label is still the model's call, but never act on the label of an abstained result.
        timing: per-stage milliseconds of this image.
        frame: index within a multi-frame file; None for a single image.
        rechecked: INT8 was unsure; these are the FP32 model's answers.
        region: which tissue region of a dual view (:mod:`edge_runtime.io.regions`); None for one.
        pixel_spacing_mm: (row, column) spacing of the classified frame, where the file gives it.
        origin: ``(x, y)`` in the file's frame of the classified image's top-left pixel: a DICOM
            tissue region's offset (:mod:`edge_runtime.io.regions`); ``(0, 0)`` for a whole frame.
        lesion: the largest lesion the model found (None when it found none, or has no lesion
            output); its box is in the whole frame's pixels.
        unfamiliar: unlike the training scans (:mod:`edge_runtime.postprocess.decision`); abstains.
        not_a_scan: the input check found no ultrasound scan in it (a blank frame, noise...:
            :mod:`edge_runtime.io.scan_check`); abstains. Such a frame shows no tissue, so it
            cannot hide a lesion, unlike one that abstained for any other reason.
        abstain_reason: why it abstained, every reason that applies joined by ``"; "`` (e.g.
            ``"not an ultrasound scan: a blank frame (98% of its pixels within 0 grey levels)"``);
            None when it did not.
        heatmap: uint8 ``[h, w]`` at the classified image's size, with ``heatmaps=True``.
        image: the decoded uint8 ``[h, w]`` image that was classified (a tissue region's crop
            of the frame, at ``origin``), with ``heatmaps=True``.
        model_version: the ``model_version`` of the model that answered (its metadata).
        model_sha256: the hex SHA-256 of the model that answered (:attr:`Classifier.model_sha256`):
            unlike ``model_version``, it tells any two models apart.
        lesion_mask: uint8 ``[H, W]`` at the whole frame's size (255 inside the lesion, 0
            outside), with ``masks=True`` or ``heatmaps=True`` (whose overlays outline it) and a
            model with a lesion output.
    """

    ok: ClassVar[Literal[True]] = True
    error: ClassVar[None] = None

    source: str
    label: str
    probabilities: Mapping[str, float]
    confidence: float
    abstained: bool
    timing: Timing
    frame: int | None = None
    rechecked: bool = False
    region: int | None = None
    pixel_spacing_mm: tuple[float, float] | None = None
    origin: tuple[int, int] = (0, 0)
    model_version: str | None = None
    model_sha256: str | None = None
    lesion: Lesion | None = None
    unfamiliar: bool = False
    not_a_scan: bool = False
    abstain_reason: str | None = None
    heatmap: np.ndarray | None = field(default=None, repr=False, compare=False)
    image: np.ndarray | None = field(default=None, repr=False, compare=False)
    lesion_mask: np.ndarray | None = field(default=None, repr=False, compare=False)


@dataclass(frozen=True, kw_only=True)
class Failure:
    """An input (or frame) that could not be classified, and why.

    Attributes:
        source: the input's path (``"<array>"`` for an array).
        error: the reason, e.g. ``"file is empty (0 bytes)"``.
        timing: the milliseconds spent before it failed (decoding, usually).
        frame: the frame it failed at, in a multi-frame file (the frames after it are not
            tried when its decoding fails); None for the whole input.
        region: the tissue region of a dual view it failed at; None for one.
        model_version: the ``model_version`` of the model it was given to (None where no model
            was involved).
        model_sha256: that model's hex SHA-256 (:attr:`Classifier.model_sha256`; None likewise).
    """

    ok: ClassVar[Literal[False]] = False

    source: str
    error: str
    timing: Timing = Timing()
    frame: int | None = None
    region: int | None = None
    model_version: str | None = None
    model_sha256: str | None = None


Result: TypeAlias = Classification | Failure
"""What :meth:`Classifier.classify` gives per image: check ``result.ok`` (or ``isinstance``)."""


class SquareCalls(NamedTuple):
    """:meth:`Classifier.call_squares`'s answer for ``N`` input squares."""

    probabilities: np.ndarray  # [N, K] uncalibrated, the FP32 model's rows where rechecked
    called: np.ndarray  # int [N]: indices into the model's class names
    rechecked: np.ndarray  # bool [N]: rows rerun in FP32
    unfamiliar_scores: np.ndarray  # [N]; zeros when the model has no unfamiliar-scan score


def _square_shapes(images: np.ndarray) -> list[tuple[int, int]]:
    return [tuple(images.shape[1:3])] * len(images)


class _Outputs(NamedTuple):
    probabilities: np.ndarray  # [N, K]
    cam: np.ndarray  # [N, h, w, K]
    lesion: np.ndarray | None  # [N, h, w, 1]; None: the model has no lesion output
    rechecked: np.ndarray  # bool [N]: rows that are the FP32 recheck model's
    features: np.ndarray | None  # [N, D], when the unfamiliar-scan score needs them


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


def default_precision(provider_name: str, *, saturating_cpu: bool | None = None) -> Precision:
    """The bundled model to run on an onnxruntime provider: FP32 on CUDA, and on the CPU
    provider of an x86 CPU whose INT8 kernels saturate; INT8 elsewhere.

    onnxruntime's CUDA provider has no INT8 convolution kernels and runs the INT8 model's
    convolutions in float between (de)quantize steps, slower than the FP32 model (docs/gpu.md).
    The CPU provider and TensorRT run INT8 as integer arithmetic, exact except on x86 CPUs
    without VNNI (:func:`edge_runtime.model.cpu.int8_saturates`; ``saturating_cpu`` overrides the
    check), where the INT8 model is not the one its parity gates passed.
    """
    if provider_name == "CUDAExecutionProvider":
        return Precision.FP32
    if provider_name == "CPUExecutionProvider":
        saturating = int8_saturates() if saturating_cpu is None else saturating_cpu
        if saturating:
            return Precision.FP32
    return Precision.INT8


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
        ...         if result.ok:
        ...             print(result.source, result.label, result.confidence)
        ...         else:
        ...             print(result.source, "failed:", result.error)
    """

    def __init__(
        self,
        model: LoadedModel,
        options: ClassifierOptions,
        recheck: LoadedModel | LazyModel | None = None,
    ) -> None:
        self._model = model
        self._recheck = recheck
        self._options = options
        self._reader = ScanReader(
            model.spec.input_size,
            model.spec.resize_policy,
            batch_size=options.batch_size,
            decode_workers=options.decode_workers,
            check_input=options.check_input,
        )
        self._inference_pool = (
            ThreadPoolExecutor(options.batches_at_once, thread_name_prefix="inference")
            if options.batches_at_once > 1
            else None
        )
        self._abstain_below = (
            model.spec.abstain_threshold if options.abstain_below is None else options.abstain_below
        )
        self._malignant_threshold = (
            model.spec.malignant_threshold
            if options.malignant_threshold is None
            else options.malignant_threshold
        )
        outputs = {o.name for o in model.session.get_outputs()}
        self._unfamiliar = FEATURES in outputs and "threshold" in model.spec.unfamiliar

    @classmethod
    def from_options(cls, options: ClassifierOptions) -> Classifier:
        """Open the model that ``options`` names and check its contract."""

        def open_(path: Path) -> LoadedModel:
            return open_model(path, provider=options.provider, threads=options.threads or 1)

        model = open_(resolve_model_path(options.model_path, options.provider))
        fitting = default_precision(model.providers[0])
        if options.model_path is None and model.spec.precision is not fitting:
            model = open_(default_model_path(fitting))  # its first provider failed to start
        if (
            model.spec.precision is Precision.INT8
            and model.providers[0] == "CPUExecutionProvider"
            and int8_saturates()
        ):
            log.warning(
                "%s: this x86 CPU has no VNNI, and onnxruntime's INT8 kernels saturate on it: "
                "answers may differ from the FP32 model's more than the export's gates allowed. "
                "Prefer the FP32 model on this host (--model fp32; docs/usage.md).",
                display_path(model.path),
            )
        recheck = None
        if options.recheck:
            recheck = open_recheck_model(
                model, provider=options.provider, threads=options.threads or 1
            )
        return cls(model, options, recheck)

    @classmethod
    def from_path(
        cls,
        path: str | os.PathLike[str],
        options: ClassifierOptions | None = None,
        /,
        **fields: Any,
    ) -> Classifier:
        """Open the ONNX model file ``path`` with ``options`` (default :class:`ClassifierOptions`;
        its ``model_path`` is replaced by ``path``). Keyword ``fields`` override single
        :class:`ClassifierOptions` fields (``Classifier.from_path(p, batch_size=1)``).

        Raises:
            TypeError: a keyword that is not a :class:`ClassifierOptions` field.
            FileNotFoundError / ContractError: the file is missing or not an edge-classify model.
        """
        base = ClassifierOptions() if options is None else options
        return cls.from_options(replace(base, model_path=path, **fields))

    @classmethod
    def default(cls, **options) -> Classifier:
        """Open the bundled model that runs right on this host: FP32 under CUDA and on x86 CPUs
        without VNNI, INT8 elsewhere (:func:`default_precision`). Keyword arguments are
        :class:`ClassifierOptions` fields (``provider``, ``threads``, ...)."""
        return cls.from_options(ClassifierOptions(**options))

    @property
    def spec(self) -> ModelSpec:
        return self._model.spec

    @property
    def model_path(self) -> Path:
        return self._model.path

    @property
    def model_sha256(self) -> str:
        """Hex SHA-256 of the model's content, as checked against its card when loaded
        (:func:`~edge_runtime.model.card.model_digest`; the FP32 recheck model not included)."""
        return self._model.sha256

    @property
    def model_fields(self) -> dict[str, str]:
        """``model_version`` and ``model_sha256``: the fields by which each result (a
        :class:`Failure` too) names the model that answered."""
        return {"model_version": self.spec.model_version, "model_sha256": self.model_sha256}

    @property
    def providers(self) -> tuple[str, ...]:
        return self._model.providers

    @property
    def abstain_below(self) -> float:
        return self._abstain_below

    @property
    def malignant_threshold(self) -> float:
        """P(malignant) at or above which a scan is called malignant; 0: plain top-1."""
        return self._malignant_threshold

    @property
    def recheck_model_path(self) -> Path | None:
        """The FP32 model that reruns the scans this INT8 model is unsure of, if any."""
        return None if self._recheck is None else self._recheck.path

    def classify(
        self, sources: Iterable[Source], *, heatmaps: bool = False, masks: bool = False
    ) -> list[Result]:
        """Classify files (paths) or 2-D / BGR arrays; one result per image or DICOM frame.

        A bad input gives a :class:`Failure` with its ``error``; it never stops the others,
        which are :class:`Classification` results.

        Args:
            sources: paths or arrays.
            heatmaps: attach ``heatmap`` and ``image`` (and, with a lesion output,
                ``lesion_mask``) to each result.
            masks: attach ``lesion_mask`` to each result.

        Raises:
            TypeError: ``sources`` is one path or one array, not a collection of them.
            ValueError: ``masks`` with a model that has no lesion output.
        """
        return list(self.iter_classify(sources, heatmaps=heatmaps, masks=masks))

    def iter_classify(
        self, sources: Iterable[Source], *, heatmaps: bool = False, masks: bool = False
    ) -> Iterator[Result]:
        """Like :meth:`classify`, yielding results in input order as each batch completes.

        Failed inputs wait in the batch beside good ones, so the order is kept; every batch
        holds at most ``batch_size`` images, whatever one file holds. A model without a lesion
        output asked for ``masks`` is refused here, before any input is read.
        """
        if _one_source(sources):  # iterating it would give characters or pixel rows
            raise TypeError(
                f"sources is one {type(sources).__name__}, not a collection; pass a list of "
                "paths or arrays, e.g. classify([path])"
            )
        if masks:
            require_lesion_output(self.spec, str(self.model_path), "leave out masks=True")
        return self._iter_classify(sources, heatmaps, masks)

    def _iter_classify(
        self, sources: Iterable[Source], heatmaps: bool, masks: bool
    ) -> Iterator[Result]:
        size = self._options.batch_size
        pending: list[DecodedItem] = []
        running: deque[Future[list[Result]]] = deque()  # batches in flight, in input order
        keep_original = heatmaps or self.spec.has_lesion  # the lesion is measured at its size
        for items in self._reader.items(sources, keep_original=keep_original):
            pending.extend(items)
            while (cut := _batch_end(pending, size)) is not None:
                running.append(self._start(pending[:cut], heatmaps, masks))
                pending = pending[cut:]
                while len(running) >= self._options.batches_at_once:
                    yield from running.popleft().result()
        if pending:
            running.append(self._start(pending, heatmaps, masks))
        while running:
            yield from running.popleft().result()

    def _start(self, batch: list[DecodedItem], heatmaps: bool, masks: bool) -> Future[list[Result]]:
        """Run one batch on an inference thread, or here when one batch runs at a time."""
        if self._inference_pool is not None:
            return self._inference_pool.submit(self._finish, batch, heatmaps, masks)
        done: Future[list[Result]] = Future()
        done.set_result(self._finish(batch, heatmaps, masks))
        return done

    def _finish(self, pending: list[DecodedItem], heatmaps: bool, masks: bool) -> list[Result]:
        good = [item for item in pending if item.error is None]
        done = iter(self._run_batch(good, heatmaps, masks) if good else [])
        return [next(done) if item.error is None else self._failure(item) for item in pending]

    def run_raw(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The model's raw outputs for a uint8 ``[N, S, S, 1]`` batch of input squares:
        **uncalibrated** ``probabilities`` ``[N, K]`` and ``cam``, with the FP32 model's rows
        where it rechecked INT8 (:attr:`recheck_model_path`). No temperature, operating point,
        lesion rule or input check: :meth:`classify` gives the calls."""
        outputs = self._run_rechecked(images, _square_shapes(images))
        return outputs.probabilities, outputs.cam

    def call_squares(self, images: np.ndarray) -> SquareCalls:
        """The calls for a uint8 ``[N, S, S, 1]`` batch of input squares, each taken as the
        whole frame: exactly as :meth:`classify` makes them (FP32 recheck, calibration,
        operating point, lesion rule), without reading files or checking the input. The gate on
        written model files (:mod:`edge_runtime.model.verify`) compares these."""
        outputs = self._run_rechecked(images, _square_shapes(images))
        _, _, called = self._decide(outputs, _square_shapes(images), [None] * len(images), False)
        scores, _ = self._unfamiliar_scores(outputs)
        return SquareCalls(outputs.probabilities, called, outputs.rechecked, scores)

    def run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Deprecated alias of :meth:`run_raw` (its name hid that it is uncalibrated); kept for
        one release."""
        import warnings

        warnings.warn(
            "Classifier.run is renamed Classifier.run_raw (uncalibrated outputs); run will be "
            "removed in the next release",
            DeprecationWarning,
            stacklevel=2,
        )
        return self.run_raw(images)

    def _run_rechecked(self, images: np.ndarray, shapes: Sequence[tuple[int, int]]) -> _Outputs:
        """All outputs of the model, with the FP32 recheck model's rows (lesion too) where it
        reran what INT8 was unsure of (:func:`~edge_runtime.postprocess.recheck.near_a_call`);
        ``shapes`` are the frames' ``(rows, columns)``, for the lesion map's peak."""
        spec = self._model.spec
        names = [PROBABILITIES, CAM] + ([LESION] if spec.has_lesion else [])
        if self._unfamiliar:
            names.append(FEATURES)
        outputs = self._model.session.run(names, {INPUT_NAME: images})
        redo = np.zeros(len(images), dtype=bool)
        if self._recheck is not None:
            peaks = None
            if spec.has_lesion and spec.recheck_lesion_margin > 0:
                peaks = np.array(
                    [
                        lesion_peak(
                            outputs[2][row, :, :, 0], shape, spec.input_size, spec.resize_policy
                        )
                        for row, shape in enumerate(shapes)
                    ]
                )
            redo = near_a_call(spec, outputs[0], self._malignant_threshold, peaks)
            if redo.any():
                again = self._recheck.session.run(names, {INPUT_NAME: images[redo]})
                for output, rerun in zip(outputs, again, strict=True):
                    output[redo] = rerun
        by_name = dict(zip(names, outputs, strict=True))
        return _Outputs(
            by_name[PROBABILITIES], by_name[CAM], by_name.get(LESION), redo, by_name.get(FEATURES)
        )

    def close(self) -> None:
        """Stop the decode and inference threads. The session is released with the object."""
        self._reader.close()
        if self._inference_pool is not None:
            self._inference_pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> Classifier:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _run_batch(
        self, batch: Sequence[DecodedItem], heatmaps: bool, masks: bool
    ) -> list[Classification]:
        start = time.perf_counter()
        images = np.stack([item.square for item in batch])[..., None]
        stack_ms = _ms_since(start)
        start = time.perf_counter()
        shapes = [  # without a lesion output the frame is not kept, nor needed
            images.shape[1:3] if item.original is None else item.original.shape[:2]
            for item in batch
        ]
        outputs = self._run_rechecked(images, shapes)
        cam, rechecked = outputs.cam, outputs.rechecked
        inference_ms = _ms_since(start) / len(batch)
        start = time.perf_counter()
        spec = self._model.spec
        names = spec.class_names
        scores, unfamiliar = self._unfamiliar_scores(outputs)
        probabilities, found, called = self._decide(
            outputs,
            shapes,
            [item.pixel_spacing_mm for item in batch],
            masks or heatmaps,
        )
        found = [  # a tissue region's lesion, in the whole frame's pixels
            in_frame(*pair, item.origin, item.frame_shape)
            for pair, item in zip(found, batch, strict=True)
        ]
        if spec.has_lesion and "normal" in names:  # a scan called normal gets no outline
            found = [
                (None, None if pair[1] is None else np.zeros_like(pair[1]))
                if names[int(call)] == "normal"
                else pair
                for pair, call in zip(found, called, strict=True)
            ]
        results = []
        for row, item in enumerate(batch):
            top = int(called[row])
            confidence = float(probabilities[row, top])
            reasons = [
                item.not_a_scan,
                f"unfamiliar: unlike the scans the model was trained on (score {scores[row]:.2f} "
                f"above {float(spec.unfamiliar['threshold']):.2f})"
                if unfamiliar[row]
                else None,
                f"low confidence: {confidence:.3f} is below {self._abstain_below:.3f}"
                if confidence < self._abstain_below and names[top] != MALIGNANT
                else None,
            ]
            abstain_reason = "; ".join(reason for reason in reasons if reason) or None
            lesion, mask = found[row]
            heat = None
            if heatmaps and item.original is not None:
                heat = (
                    lesion_heatmap(
                        outputs.lesion[row, :, :, 0],
                        item.original.shape,
                        spec.input_size,
                        spec.resize_policy,
                    )
                    if outputs.lesion is not None
                    else cam_to_heatmap(
                        cam[row, :, :, top],
                        item.original.shape,
                        spec.input_size,
                        spec.resize_policy,
                    )
                )
            results.append(
                Classification(
                    source=item.source,
                    label=names[top],
                    probabilities=dict(zip(names, map(float, probabilities[row]), strict=True)),
                    confidence=confidence,
                    abstained=abstain_reason is not None,
                    timing=Timing(
                        item.decode_ms,
                        item.preprocess_ms + stack_ms / len(batch),
                        inference_ms,
                        0.0,
                    ),
                    frame=item.frame,
                    rechecked=bool(rechecked[row]),
                    region=item.region,
                    pixel_spacing_mm=item.pixel_spacing_mm,
                    origin=item.origin,
                    **self.model_fields,
                    lesion=lesion,
                    unfamiliar=bool(unfamiliar[row]),
                    not_a_scan=item.not_a_scan is not None,
                    abstain_reason=abstain_reason,
                    heatmap=heat,
                    image=item.original if heatmaps else None,
                    lesion_mask=mask,
                )
            )
        post_ms = _ms_since(start) / len(batch)
        return [_with_postprocess(r, post_ms) for r in results]

    def _unfamiliar_scores(self, outputs: _Outputs) -> tuple[np.ndarray, np.ndarray]:
        """Each frame's unfamiliar-scan score ``[N]`` and whether it lies above the model's
        threshold (bool ``[N]``); zeros and False when the model has no such score."""
        count = len(outputs.probabilities)
        if outputs.features is None:
            return np.zeros(count), np.zeros(count, bool)
        spec = self._model.spec
        scores = unfamiliar_scores(outputs.features, spec.unfamiliar)
        return scores, scores > float(spec.unfamiliar["threshold"])

    def _decide(
        self,
        outputs: _Outputs,
        shapes: Sequence[tuple[int, int]],
        spacings: Sequence[tuple[float, float] | None],
        with_mask: bool,
    ) -> tuple[np.ndarray, list[tuple[Lesion | None, np.ndarray | None]], np.ndarray]:
        """Calibrated probabilities, each frame's lesion (and mask), and the called class
        indices, from the model's outputs for frames of ``shapes``."""
        spec = self._model.spec
        probabilities = _calibrate(outputs.probabilities, spec.temperature)
        found = [
            find_lesion(
                outputs.lesion[row, :, :, 0],
                shape,
                input_size=spec.input_size,
                policy=spec.resize_policy,
                threshold=spec.lesion_threshold,
                min_area=spec.lesion_min_area,
                pixel_spacing_mm=spacing,
                with_mask=with_mask,
            )
            if outputs.lesion is not None
            else (None, None)
            for row, (shape, spacing) in enumerate(zip(shapes, spacings, strict=True))
        ]
        lesion_found = lesion_verdict(
            spec.normal_rule.value,
            np.array([lesion is not None for lesion, _ in found]) if spec.has_lesion else None,
            probabilities,
            spec.class_names,
            self._malignant_threshold,
            spec.normal_gate,
        )
        called = decide(probabilities, spec.class_names, self._malignant_threshold, lesion_found)
        return probabilities, found, called

    def _failure(self, item: DecodedItem) -> Failure:
        return Failure(
            source=item.source,
            error=item.error,
            timing=Timing(decode_ms=item.decode_ms),
            frame=item.frame,
            region=item.region,
            **self.model_fields,
        )


def _batch_end(pending: Sequence[DecodedItem], size: int) -> int | None:
    """The length of the prefix of ``pending`` that holds ``size`` good items, or None."""
    good = 0
    for index, item in enumerate(pending):
        good += item.error is None
        if good == size:
            return index + 1
    return None


def _with_postprocess(result: Classification, post_ms: float) -> Classification:
    return replace(result, timing=replace(result.timing, postprocess_ms=post_ms))


def _ms_since(start: float) -> float:
    return (time.perf_counter() - start) * 1000.0


def _one_source(sources: object) -> bool:
    """Whether ``sources`` is one path or one image (2-D gray or H x W x 3/4 colour) rather than
    a collection of them; a stack of images (N x H x W) is a collection."""
    if isinstance(sources, str | os.PathLike):
        return True
    if isinstance(sources, np.ndarray):
        return sources.ndim <= 2 or (sources.ndim == 3 and sources.shape[-1] in (3, 4))
    return False
