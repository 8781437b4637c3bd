"""The PNG images edge-classify writes (``--heatmaps``, ``--masks``) carry a mark, so that a
later run never classifies them as scans.

The mark is a PNG ``tEXt`` chunk right after ``IHDR`` (PNG specification, 11.3.4.3): keyword
``Software``, text ``edge-classify <kind>``, where kind is ``heatmap``, ``overlay`` or ``mask``.
Viewers ignore it; :func:`written_kind` reads it from a file's first bytes.
"""

from __future__ import annotations

import struct
import zlib

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_IHDR_END = len(PNG_SIGNATURE) + 8 + 13 + 4  # signature, IHDR's length and type, body, CRC
_KEYWORD = b"Software"
_PREFIX = b"edge-classify "


def describe(kind: str) -> str:
    """What an image of ``kind`` that edge-classify wrote is, in words for a message."""
    return f"an edge-classify {kind} (written by --heatmaps or --masks)"


def mark(png: bytes, kind: str) -> bytes:
    """``png`` (an encoded PNG, as ``cv2.imencode`` gives it) with the mark of ``kind``.

    Raises:
        ValueError: ``png`` does not start with a PNG signature and IHDR.
    """
    if not png.startswith(PNG_SIGNATURE) or png[12:16] != b"IHDR":
        raise ValueError("not an encoded PNG")
    body = _KEYWORD + b"\x00" + _PREFIX + kind.encode("ascii")
    chunk = struct.pack(">I", len(body)) + b"tEXt" + body
    chunk += struct.pack(">I", zlib.crc32(b"tEXt" + body))
    return png[:_IHDR_END] + chunk + png[_IHDR_END:]


def written_kind(head: bytes) -> str | None:
    """The kind of image edge-classify wrote, read from a PNG's first 132 bytes or more; None
    for any other file (a scan, or a PNG without the mark)."""
    if not head.startswith(PNG_SIGNATURE) or len(head) < _IHDR_END + 8:
        return None
    length, chunk_type = struct.unpack(">I4s", head[_IHDR_END : _IHDR_END + 8])
    body = head[_IHDR_END + 8 : _IHDR_END + 8 + length]
    keyword, _, text = body.partition(b"\x00")
    if chunk_type != b"tEXt" or keyword != _KEYWORD or not text.startswith(_PREFIX):
        return None
    return text[len(_PREFIX) :].decode("ascii", "replace")
