"""An ONNX file's ``metadata_props`` without loading the model (no onnx package, no session).

ONNX files are a protobuf ``ModelProto``; its field 14 holds the metadata as repeated
``StringStringEntryProto`` (key = 1, value = 2). Every other field, the graph and its weights
included, is skipped by its length, so reading the metadata of a 13 MB model touches a few
kilobytes. Used to check a model's FP32 partner at start without paying for its session.
"""

from __future__ import annotations

import os
from typing import BinaryIO

_METADATA_PROPS = 14
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
