"""An ONNX file's ``metadata_props`` without loading the model (no onnx package, no session).

ONNX files are a protobuf ``ModelProto``; its field 14 holds the metadata as repeated
``StringStringEntryProto`` (key = 1, value = 2). Every other field, the graph and its weights
included, is skipped by its length, so reading the metadata of a 13 MB model touches a few
kilobytes. Used to check a model's FP32 partner at start without paying for its session.
:func:`read_external_data_locations` walks the graph's initializers alike (field 7, then 5),
reading only their ``external_data`` entries (TensorProto field 13).
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterator
from typing import BinaryIO

_METADATA_PROPS = 14
_GRAPH = 7 << 3 | 2  # ModelProto.graph, length-delimited
_INITIALIZER = 5 << 3 | 2  # GraphProto.initializer
_EXTERNAL_DATA = 13 << 3 | 2  # TensorProto.external_data
_MAX_STRING = 1 << 20


class MetadataError(ValueError):
    """The file is not a readable ONNX protobuf."""


def read_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The ``metadata_props`` of an ONNX file as a dict (what onnxruntime's
    ``custom_metadata_map`` returns).

    Raises:
        OSError: the file cannot be read.
        MetadataError: the bytes are not an ONNX ModelProto.
    """
    meta: dict[str, str] = {}
    with open(path, "rb") as handle:
        end = os.fstat(handle.fileno()).st_size
        while handle.tell() < end:
            field, wire = _key(handle)
            if field == _METADATA_PROPS and wire == 2:
                entry = _read(handle, _varint(handle), limit=_MAX_STRING)
                key, value = _entry(entry)
                meta[key] = value
            else:
                _skip(handle, wire)
            if handle.tell() > end:
                raise MetadataError(f"{path}: truncated ONNX file")
    return meta


def read_external_data_locations(path: str | os.PathLike[str]) -> list[str]:
    """The ``location`` entries of an ONNX file's graph initializers stored as external data,
    each once, in the order the initializers name them; empty for a model whose weights are all
    inside the file. The weights are skipped: 1-3 ms for each of the bundled models.

    Raises:
        OSError: the file cannot be read.
        MetadataError: the bytes are not an ONNX ModelProto.
    """
    with open(path, "rb") as handle:
        if os.fstat(handle.fileno()).st_size == 0:
            return []
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
            try:
                return list(dict.fromkeys(_initializer_locations(data)))
            except IndexError:
                raise MetadataError(f"{path}: truncated ONNX file") from None


def _initializer_locations(data: mmap.mmap) -> list[str]:
    """Every external-data ``location`` of the initializers of the ModelProto ``data``."""
    found = []
    for graph_start, graph_end in _messages(data, 0, len(data), _GRAPH):
        for start, end in _messages(data, graph_start, graph_end, _INITIALIZER):
            for entry_start, entry_end in _messages(data, start, end, _EXTERNAL_DATA):
                key, value = _entry(data[entry_start:entry_end])
                if key == "location":
                    found.append(value)
    return found


def _messages(data: mmap.mmap, i: int, end: int, wanted: int) -> Iterator[tuple[int, int]]:
    """(start, end) of each length-delimited field of key ``wanted`` between ``i`` and
    ``end``, the others skipped."""
    while i < end:
        key = data[i]  # one byte for fields 1-15, nearly all of them
        key, i = (key, i + 1) if key < 0x80 else _varint_at(data, i)
        wire = key & 7
        if wire == 2:
            length, i = _varint_at(data, i)
            if key == wanted:
                yield i, i + length
            i += length
        elif wire == 0:
            _, i = _varint_at(data, i)
        elif wire in (1, 5):
            i += 8 if wire == 1 else 4
        else:
            raise MetadataError(f"not an ONNX file (protobuf wire type {wire})")
    if i > end:
        raise IndexError("a field runs past its message")


def _entry(data: bytes) -> tuple[str, str]:
    parts = {1: "", 2: ""}
    i = 0
    while i < len(data):
        key, i = _varint_at(data, i)
        field, wire = key >> 3, key & 7
        if wire != 2:
            raise MetadataError("metadata entry with a non-string field")
        length, i = _varint_at(data, i)
        parts[field] = data[i : i + length].decode("utf-8", "replace")
        i += length
    return parts[1], parts[2]


def _key(handle: BinaryIO) -> tuple[int, int]:
    key = _varint(handle)
    return key >> 3, key & 7


def _skip(handle: BinaryIO, wire: int) -> None:
    if wire == 0:
        _varint(handle)
    elif wire == 1:
        handle.seek(8, os.SEEK_CUR)
    elif wire == 2:
        handle.seek(_varint(handle), os.SEEK_CUR)
    elif wire == 5:
        handle.seek(4, os.SEEK_CUR)
    else:
        raise MetadataError(f"not an ONNX file (protobuf wire type {wire})")


def _varint(handle: BinaryIO) -> int:
    value = shift = 0
    while True:
        byte = handle.read(1)
        if not byte:
            raise MetadataError("truncated ONNX file")
        value |= (byte[0] & 0x7F) << shift
        if byte[0] < 0x80:
            return value
        shift += 7
        if shift > 63:
            raise MetadataError("not an ONNX file (varint too long)")


def _varint_at(data: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while i < len(data):
        byte = data[i]
        i += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, i
        shift += 7
    raise MetadataError("truncated metadata entry")


def _read(handle: BinaryIO, length: int, *, limit: int) -> bytes:
    if length > limit:
        raise MetadataError(f"metadata entry of {length:,} bytes")
    data = handle.read(length)
    if len(data) != length:
        raise MetadataError("truncated ONNX file")
    return data
