"""A restricted reader of PyTorch state-dict checkpoints that needs neither torch nor trust.

``torch.load`` unpickles arbitrary objects, so a malicious ``.pth`` file can run code. This reader
accepts only what a state dict of plain tensors is made of (``collections.OrderedDict``, the tensor
and parameter rebuild functions, typed storages) and refuses any other global by name. It reads
both PyTorch's legacy (pre-zip) serialization and the zip format of ``torch.save`` since 1.6.

Example:
    >>> state = read_state_dict("efficientnet-lite0.pth")  # doctest: +SKIP
    >>> state["_conv_stem.weight"].shape  # doctest: +SKIP
    (32, 3, 3, 3)
"""

from __future__ import annotations

import collections
import io
import pickle
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

__all__ = ["read_state_dict"]

LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL_VERSION = 1001

# numpy dtypes of torch's typed storages; bfloat16 is read as its raw 16 bits, widened later.
_STORAGE_DTYPES: dict[str, np.dtype] = {
    "DoubleStorage": np.dtype("<f8"),
    "FloatStorage": np.dtype("<f4"),
    "HalfStorage": np.dtype("<f2"),
    "BFloat16Storage": np.dtype("<u2"),
    "LongStorage": np.dtype("<i8"),
    "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"),
    "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"),
    "BoolStorage": np.dtype("?"),
}


@dataclass(frozen=True)
class _StorageType:
    name: str

    @property
    def dtype(self) -> np.dtype:
        return _STORAGE_DTYPES[self.name]


@dataclass(frozen=True)
class _StorageRef:
    """A storage named in the pickle; its bytes come later (legacy) or from another member (zip)."""

    storage_type: _StorageType
    key: str
    numel: int
    view: tuple[int, int] | None = None  # legacy storage views: (offset, numel) into the storage


@dataclass(frozen=True)
class _TensorRef:
    storage: _StorageRef
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor_v2(storage, storage_offset, size, stride, *_args) -> _TensorRef:
    if not isinstance(storage, _StorageRef):
        raise pickle.UnpicklingError(f"a tensor's storage must be a storage, got {storage!r}")
    return _TensorRef(storage, int(storage_offset), tuple(size), tuple(stride))


def _rebuild_parameter(data, *_args) -> _TensorRef:
    return data


_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    **{("torch", name): _StorageType(name) for name in _STORAGE_DTYPES},
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles only the globals of a tensor state dict; storages become ``_StorageRef``."""

    def __init__(self, file: IO[bytes], path: Path, *, zip_format: bool) -> None:
        super().__init__(file)
        self._path, self._zip_format = path, zip_format

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"{self._path}: refusing to load global '{module}.{name}'. Only tensor state "
                "dicts (OrderedDict of tensors) can be read; re-save the file with "
                "torch.save(model.state_dict(), path) from a trusted source."
            ) from None

    def persistent_load(self, pid: Any) -> _StorageRef:
        if not isinstance(pid, tuple) or not pid or pid[0] != "storage":
            raise pickle.UnpicklingError(f"{self._path}: unsupported persistent id {pid!r}")
        if self._zip_format:
            _, storage_type, key, _location, numel = pid
            view = None
        else:
            _, storage_type, key, _location, numel, view = pid
        if not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f"{self._path}: unsupported storage type {storage_type!r}")
        if view is not None:  # (view key, offset, numel): a slice of the storage named by `key`
            view = (int(view[1]), int(view[2]))
        return _StorageRef(storage_type, str(key), int(numel), view)


def read_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """Read a PyTorch state dict (legacy or zip serialization) into numpy arrays, safely.

    Args:
        path: a ``.pth``/``.pt`` file written by ``torch.save(module.state_dict(), path)``.

    Returns:
        The state dict: parameter and buffer names mapped to arrays in torch's layout and dtype
        (bfloat16 becomes float32).

    Raises:
        pickle.UnpicklingError: the file references anything other than a tensor state dict.
        ValueError: the file is not a PyTorch checkpoint, or its tensors are inconsistent.
    """
    path = Path(path)
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            return _read_zip(archive, path)
    with path.open("rb") as file:
        return _read_legacy(file, path)


def _read_legacy(file: IO[bytes], path: Path) -> dict[str, np.ndarray]:
    def load() -> Any:
        return _RestrictedUnpickler(file, path, zip_format=False).load()

    try:
        magic = load()
    except (pickle.UnpicklingError, EOFError, ValueError) as exc:
        raise ValueError(f"{path}: not a PyTorch checkpoint ({exc}).") from exc
    if magic != LEGACY_MAGIC_NUMBER:
        raise ValueError(f"{path}: not a PyTorch checkpoint (bad magic number {magic!r}).")
    if load() != LEGACY_PROTOCOL_VERSION:
        raise ValueError(
            f"{path}: unsupported legacy protocol; expected {LEGACY_PROTOCOL_VERSION}."
        )
    sys_info = load()
    if not isinstance(sys_info, dict) or not sys_info.get("little_endian", False):
        raise ValueError(f"{path}: only little-endian checkpoints are supported.")
    root = load()
    keys = load()
    if not isinstance(keys, list):
        raise ValueError(f"{path}: malformed storage key list {keys!r}.")
    refs = {ref.key: ref for ref in _storage_refs(root)}
    storages: dict[str, np.ndarray] = {}
    for key in keys:
        if key not in refs:
            raise ValueError(f"{path}: storage {key!r} is listed but never used.")
        dtype = refs[key].storage_type.dtype
        header = file.read(8)
        if len(header) != 8:
            raise ValueError(f"{path}: truncated before storage {key!r}.")
        (numel,) = struct.unpack("<q", header)
        storages[key] = _frombuffer(file.read(numel * dtype.itemsize), dtype, numel, path, key)
    return _state_dict(root, storages, path)


def _read_zip(archive: zipfile.ZipFile, path: Path) -> dict[str, np.ndarray]:
    pickles = [name for name in archive.namelist() if name.endswith("/data.pkl")]
    if len(pickles) != 1:
        raise ValueError(f"{path}: a zip checkpoint needs exactly one '<name>/data.pkl' entry.")
    prefix = pickles[0][: -len("data.pkl")]
    if (
        prefix + "byteorder" in archive.namelist()
        and archive.read(prefix + "byteorder") != b"little"
    ):
        raise ValueError(f"{path}: only little-endian checkpoints are supported.")
    root = _RestrictedUnpickler(io.BytesIO(archive.read(pickles[0])), path, zip_format=True).load()
    storages: dict[str, np.ndarray] = {}
    for ref in _storage_refs(root):
        if ref.key not in storages:
            raw = archive.read(f"{prefix}data/{ref.key}")
            storages[ref.key] = _frombuffer(raw, ref.storage_type.dtype, ref.numel, path, ref.key)
    return _state_dict(root, storages, path)


def _storage_refs(root: Any) -> list[_StorageRef]:
    if not isinstance(root, dict):
        raise ValueError(f"expected a state dict (a mapping of names to tensors), got {type(root)}")
    return [value.storage for value in root.values() if isinstance(value, _TensorRef)]


def _frombuffer(raw: bytes, dtype: np.dtype, numel: int, path: Path, key: str) -> np.ndarray:
    if len(raw) != numel * dtype.itemsize:
        raise ValueError(f"{path}: storage {key!r} is truncated.")
    return np.frombuffer(raw, dtype=dtype, count=numel)


def _state_dict(root: Any, storages: dict[str, np.ndarray], path: Path) -> dict[str, np.ndarray]:
    state = {}
    for name, value in root.items():
        if not isinstance(value, _TensorRef):
            raise ValueError(f"{path}: entry {name!r} is not a tensor ({type(value).__name__}).")
        state[str(name)] = _tensor(value, storages, path, str(name))
    return state


def _tensor(ref: _TensorRef, storages: dict[str, np.ndarray], path: Path, name: str) -> np.ndarray:
    storage = ref.storage
    data = storages[storage.key]
    if storage.view is not None:
        data = data[storage.view[0] : storage.view[0] + storage.view[1]]
    if len(ref.size) != len(ref.stride) or min((*ref.size, *ref.stride, ref.offset), default=0) < 0:
        raise ValueError(
            f"{path}: tensor {name!r} has invalid size/stride {ref.size}/{ref.stride}."
        )
    if 0 in ref.size:
        array = np.zeros(ref.size, dtype=data.dtype)
    else:
        last = ref.offset + sum((n - 1) * s for n, s in zip(ref.size, ref.stride, strict=True))
        if last >= data.size:
            raise ValueError(
                f"{path}: tensor {name!r} reads past the end of its storage "
                f"(element {last} of {data.size})."
            )
        strides = tuple(s * data.itemsize for s in ref.stride)
        view = np.lib.stride_tricks.as_strided(
            data[ref.offset :], shape=ref.size, strides=strides, writeable=False
        )
        array = np.array(view)
    if storage.storage_type.name == "BFloat16Storage":
        array = (array.astype(np.uint32) << 16).view(np.float32)
    return array
