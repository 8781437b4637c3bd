"""onnxruntime sessions: explicit options, providers chosen in order, fallbacks reported."""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import numpy as np
import onnxruntime as ort

from edge_runtime.model.card import (
    listed_hashes,
    model_digest,
    model_hashes,
    require_listed_hashes,
    verify_against_card,
)
from edge_runtime.model.contract import (
    INPUT_NAME,
    KEY_PRECISION,
    KEY_UNFAMILIAR,
    PROBABILITIES,
    ContractError,
    ModelSpec,
    Precision,
    TensorInfo,
    check_io,
    check_recheck_partner,
)
from edge_runtime.model.external_data import require_external_data
from edge_runtime.model.onnx_meta import MetadataError, read_metadata
from edge_runtime.model.session_cache import create_cached_session, load_cached_session

log = logging.getLogger(__name__)


class Provider(str, Enum):
    """Execution provider request. AUTO takes the best installed: TensorRT (when its libraries
    load), CUDA, then CPU."""

    AUTO = "auto"
    CPU = "cpu"
    CUDA = "cuda"
    TENSORRT = "tensorrt"


_ORT_NAMES = {
    Provider.TENSORRT: "TensorrtExecutionProvider",
    Provider.CUDA: "CUDAExecutionProvider",
    Provider.CPU: "CPUExecutionProvider",
}


# onnxruntime and onnxruntime-gpu install the same package: with both, the CPU build can win.
_GPU_INSTALL_HINT = (
    "For CUDA/TensorRT, replace onnxruntime with onnxruntime-gpu: "
    "pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu"
)


@dataclass(frozen=True)
class LoadedModel:
    """An open session with the contract it was checked against; ``sha256`` is the hex SHA-256
    of the model's content (:func:`~edge_runtime.model.card.model_digest`: the file's own, or one
    over it and its external-data files)."""

    session: ort.InferenceSession
    spec: ModelSpec
    path: Path
    providers: tuple[str, ...]
    sha256: str


def choose_providers(provider: Provider | str) -> list[str]:
    """onnxruntime provider names to try, in order, for the request.

    Raises:
        ValueError: a GPU provider was asked for explicitly but is not installed.
    """
    provider = Provider(provider)  # a plain "cpu" from the Python API works too
    available = set(ort.get_available_providers())
    if provider is Provider.AUTO:
        order = [Provider.TENSORRT, Provider.CUDA, Provider.CPU]
        names = [_ORT_NAMES[p] for p in order if _ORT_NAMES[p] in available]
        if names[0] == _ORT_NAMES[Provider.TENSORRT] and not tensorrt_loadable():
            names.pop(0)  # probed only where a GPU build lists it: CPU-only hosts pay nothing
        return names
    name = _ORT_NAMES[provider]
    if name not in available:
        raise ValueError(
            f"The provider {provider.value!r} is not available in this onnxruntime build "
            f"(available: {sorted(available)}). {_GPU_INSTALL_HINT}, or pass --provider cpu."
        )
    return [name] if provider is Provider.CPU else [name, _ORT_NAMES[Provider.CPU]]


@functools.cache
def tensorrt_loadable() -> bool:
    """Whether TensorRT's runtime library (nvinfer) is found on the library path and loads.

    onnxruntime-gpu lists its TensorRT provider whether or not TensorRT is installed; without
    it, every session that asks for TensorRT first fails, prints a banner on stdout and retries
    on CUDA. AUTO skips TensorRT then (a TensorRT installed only as Python wheels is not found
    here: ask for it with ``Provider.TENSORRT``). Probed once per process: ``find_library``
    may run ``ldconfig``. ``ctypes.util`` is imported here, not at start (it pulls in
    ``subprocess``, ``shutil`` and ``tempfile``).
    """
    import ctypes.util

    for name in ("nvinfer", "nvinfer_10"):
        found = ctypes.util.find_library(name)
        if found:
            try:
                ctypes.CDLL(found)
            except OSError:
                continue
            return True
    return False


def _create_session(
    path: Path, options: ort.SessionOptions, providers: list[str]
) -> ort.InferenceSession:
    """An onnxruntime session whose fallback banner goes to the log, not to stdout.

    When a provider fails to start, onnxruntime prints "EP Error ... Falling back" with
    ``print``, which would land in the middle of results written to stdout (JSON lines, CSV).
    """
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
    for line in printed.getvalue().splitlines():
        if text := line.strip(" *"):
            log.warning("onnxruntime: %s", text)
    return session


def open_model(
    path: str | os.PathLike[str],
    *,
    provider: Provider = Provider.AUTO,
    threads: int | None = None,
    exact_int8: bool = False,
) -> LoadedModel:
    """Open an ONNX model, check the contract, and report the providers actually in use.

    Args:
        path: the .onnx file (its weights may lie in external-data files beside it).
        provider: which execution provider to prefer.
        threads: intra-op threads (None: onnxruntime's default, one per core).
        exact_int8: for an INT8 (QDQ) model, turn graph optimizations off so that onnxruntime
            runs each DequantizeLinear -> op -> QuantizeLinear as written, in float: the
            arithmetic that exact integer kernels (VNNI, ARM dot products) compute, without the
            16-bit saturation of x86 CPUs without VNNI
            (:func:`edge_runtime.model.cpu.int8_saturates`).
            Slower; for judging an INT8 model on such a host, not for serving.

    Raises:
        FileNotFoundError: no such file, or an external-data file it names is missing.
        ContractError: the file is not a model, not an edge-classify model, or it or an
            external-data file does not match the SHA-256 in the model card beside it.
        ValueError: an unavailable provider was requested.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: model file not found")
    listed = listed_hashes(path)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if exact_int8 and _precision_of(path) == Precision.INT8.value:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1. Got {threads} instead.")
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    options.log_severity_level = 3
    # The graph kept for the SHA-256 the card lists loads while the files are hashed beside it
    # (both release the GIL); it is used only once the files' own SHA-256 are those. A graph is
    # only ever optimized and kept under the files' own (model_digest: external data included).
    with ThreadPoolExecutor(1, thread_name_prefix="model-sha256") as hasher:
        hashing = hasher.submit(_hashes, path)
        wanted = choose_providers(provider)
        session = None
        if listed is not None:
            digest = model_digest(listed)
            session = load_cached_session(path, digest, options, wanted, _create_session)
        hashes = hashing.result()
    if listed is not None:
        require_listed_hashes(path, hashes, listed)
        log.debug("%s: SHA-256 matches its model card", path)
    if session is None:
        try:
            digest = model_digest(hashes)
            session = create_cached_session(path, digest, options, wanted, _create_session)
        except Exception as exc:  # onnxruntime raises its own exception types for bad files
            raise ContractError(f"{path}: onnxruntime could not load it as a model: {exc}") from exc
    used = tuple(session.get_providers())
    if wanted[0] not in used:
        log.warning("%s: %s is unavailable at run time; running on %s", path, wanted[0], used[0])
    spec = ModelSpec.from_metadata(session.get_modelmeta().custom_metadata_map, source=str(path))
    check_io(_infos(session.get_inputs()), _infos(session.get_outputs()), spec, source=str(path))
    return LoadedModel(
        session=session, spec=spec, path=path, providers=used, sha256=model_digest(hashes)
    )


def _hashes(path: Path) -> dict[str, str]:
    """:func:`~edge_runtime.model.card.model_hashes` of the model and its external-data files;
    of the file alone when it is not ONNX (onnxruntime then says what is wrong with it).

    Raises:
        FileNotFoundError: an external-data file it names is missing.
        ContractError: it names one that is not beside it.
    """
    try:
        pieces = require_external_data(path)
    except MetadataError:
        pieces = []
    return model_hashes(path, pieces)


def _precision_of(path: Path) -> str | None:
    """The ``precision`` the model's metadata states, read without opening a session."""
    try:
        return read_metadata(path).get(KEY_PRECISION)
    except MetadataError:
        return None


class LazyModel:
    """A model whose contract was checked from its metadata and whose session opens on first
    use of :attr:`session` (then it is checked in full, as :func:`open_model` does).

    The FP32 partner of an INT8 model is needed only for the scans INT8 is unsure of: a run of
    one confident scan never pays for its session. Its :attr:`spec` as
    :func:`open_recheck_model` gives it has no ``unfamiliar`` statistics (the INT8 model's own
    are used); the loaded model's has them.
    """

    def __init__(
        self, path: Path, spec: ModelSpec, check: Callable[[LoadedModel], None], **open_options
    ) -> None:
        self.path = path
        self.spec = spec
        self._check = check
        self._options = open_options
        self._loaded: LoadedModel | None = None
        self._lock = threading.Lock()

    @property
    def opened(self) -> bool:
        return self._loaded is not None

    @property
    def session(self) -> ort.InferenceSession:
        return self.load().session

    @property
    def providers(self) -> tuple[str, ...]:
        return self.load().providers

    def load(self) -> LoadedModel:
        """Open the session now (once), check it, and return it.

        Raises:
            FileNotFoundError, ContractError: as :func:`open_model`.
        """
        with self._lock:
            if self._loaded is None:
                loaded = open_model(self.path, **self._options)
                self._check(loaded)
                self._loaded = loaded
        return self._loaded


def open_recheck_model(
    model: LoadedModel, *, provider: Provider = Provider.AUTO, threads: int | None = None
) -> LazyModel | None:
    """The FP32 model that ``model``'s metadata names for rechecking the scans it is unsure of
    (:mod:`edge_runtime.postprocess.recheck`), checked now from its metadata and opened on first
    use; None when it names none.

    Raises:
        FileNotFoundError: that FP32 model, or an external-data file it names, is not beside
            ``model``.
        ContractError: it is not an edge-classify model, not the FP32 model ``model`` was
            quantized from, or it or an external-data file of it does not match the SHA-256
            the model card beside it lists (checked now, about 20 ms for the bundled partner,
            so that a damaged partner fails every run alike, not the first that rechecks).
        MetadataError: its graph is not readable ONNX.
    """
    spec = model.spec
    if not spec.rechecks:
        return None
    path = model.path.parent / spec.recheck_model
    if not path.is_file():
        raise FileNotFoundError(
            f"{model.path}: reruns in FP32 the scans it is unsure of (top-1 lead below "
            f"{spec.recheck_margin:.3f}, or near its operating point or lesion threshold), with "
            f"{path}, which is missing. Copy that file beside "
            "the model (export wrote them together), or run the INT8 model alone with "
            "--no-recheck, whose agreement with FP32 is in the model card."
        )
    try:
        metadata = read_metadata(path)
    except (OSError, MetadataError) as exc:
        raise ContractError(f"{path}: not an ONNX model ({exc})") from exc
    # a missing external-data file is named now, not at the first recheck, and a damaged file
    # fails now, whatever the scans (the card's check reads the external-data files too)
    try:
        if not verify_against_card(path):
            require_external_data(path)
    except ContractError as exc:
        raise ContractError(
            f"{exc} (the FP32 partner of {model.path.name}; or run the INT8 model alone with "
            "--no-recheck, whose agreement with FP32 is in the model card)"
        ) from exc
    # the partner's unfamiliar-scan statistics are not read here: the score is the INT8 model's
    # (up to 200 KB of JSON, a few ms of every cold start); open_model reads them on first use
    metadata.pop(KEY_UNFAMILIAR, None)
    partner = ModelSpec.from_metadata(metadata, source=str(path))
    check_recheck_partner(spec, partner, source=str(path))

    def check(loaded: LoadedModel) -> None:
        check_recheck_partner(spec, loaded.spec, source=str(path))

    return LazyModel(path, partner, check, provider=provider, threads=threads)


def _infos(args) -> list[TensorInfo]:
    return [TensorInfo(a.name, a.type, tuple(a.shape)) for a in args]


__all__ = [
    "ContractError",
    "LazyModel",
    "LoadedModel",
    "Provider",
    "choose_providers",
    "open_model",
    "open_recheck_model",
]


def batch_probabilities(
    session: ort.InferenceSession, images: np.ndarray, batch_size: int = 32
) -> np.ndarray:
    """The uncalibrated ``probabilities`` ``[N, K]`` of a uint8 batch ``[N, S, S, 1]``, run
    ``batch_size`` images at a time (memory stays bounded for any N)."""
    return np.concatenate(
        [
            session.run([PROBABILITIES], {INPUT_NAME: images[i : i + batch_size]})[0]
            for i in range(0, len(images), batch_size)
        ]
    )
