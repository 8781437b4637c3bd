"""Store an ONNX model's large initializers in external-data files beside it, none over a size.

ONNX's own layout (:mod:`onnx.external_data_helper`): each initializer of at least
:data:`MIN_EXTERNAL_BYTES` gets a ``location`` (``NAME.onnx.data1``, ``NAME.onnx.data2``, ...),
an offset and a length, and the model file keeps the graph and the small tensors. onnxruntime
and ``onnx.load`` read the files as one model from the model file's path;
:func:`edge_runtime.model.external_data.external_data_files` lists them.
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from edge_runtime.model.external_data import external_data_files

if TYPE_CHECKING:
    import onnx

__all__ = ["MIN_EXTERNAL_BYTES", "external_data_files", "split_external_data"]

MIN_EXTERNAL_BYTES = 1024  # onnx's own size_threshold: smaller tensors stay in the model file


def split_external_data(path: Path, max_bytes: int) -> list[Path]:
    """Rewrite the ONNX file ``path`` so that its initializers of at least
    :data:`MIN_EXTERNAL_BYTES` lie in ``NAME.onnx.data1``, ``NAME.onnx.data2``, ... beside it,
    filled in graph order, so that no file (the model file too) is over ``max_bytes``; they get
    the model file's permissions. External-data files it named before are replaced. Nothing is
    changed when it raises.

    Args:
        path: the .onnx file.
        max_bytes: the most bytes any one file may have.

    Returns:
        The external-data files written, in order (empty when no initializer is that large).

    Raises:
        ValueError: an initializer is over ``max_bytes`` on its own (named, with its size), or
            the model file without its large initializers still is.
    """
    import onnx
    from onnx.external_data_helper import set_external_data, write_external_data_tensors

    path = Path(path)
    old = external_data_files(path)
    model = onnx.load(str(path))  # external data it had is read in
    locations = _assign_locations(model, path, max_bytes)
    for tensor, location in locations:
        set_external_data(tensor, location)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.split-") as tmp:
        staged = Path(tmp)
        write_external_data_tensors(model, str(staged))
        onnx.save(model, str(staged / path.name))
        size = (staged / path.name).stat().st_size  # the pieces fit by construction
        if size > max_bytes:
            raise ValueError(
                f"{path}: {size:,} bytes without its initializers of {MIN_EXTERNAL_BYTES:,} "
                f"bytes or more, over the {max_bytes:,} a file may have: its graph is too large."
            )
        pieces = [staged / name for name in dict.fromkeys(loc for _, loc in locations)]
        for piece in pieces:  # onnx creates them readable by their owner alone
            piece.chmod(stat.S_IMODE(path.stat().st_mode))
        for stale in old:
            stale.unlink(missing_ok=True)
        for staged_file in (*pieces, staged / path.name):
            os.replace(staged_file, path.parent / staged_file.name)
    return [path.parent / piece.name for piece in pieces]


def _assign_locations(
    model: onnx.ModelProto, path: Path, max_bytes: int
) -> list[tuple[onnx.TensorProto, str]]:
    """(initializer, location) for each initializer of at least :data:`MIN_EXTERNAL_BYTES`:
    each file filled in graph order until the next would take it over ``max_bytes``.

    Raises:
        ValueError: an initializer is over ``max_bytes`` on its own.
    """
    assigned = []
    filled: list[int] = []  # bytes in each file so far
    for tensor in model.graph.initializer:
        size = len(tensor.raw_data)
        if size < MIN_EXTERNAL_BYTES:
            continue
        if size > max_bytes:
            raise ValueError(
                f"{path}: initializer {tensor.name!r} is {size:,} bytes, over the "
                f"{max_bytes:,} an external-data file may have; a tensor is never split "
                "across files."
            )
        if not filled or filled[-1] + size > max_bytes:
            filled.append(0)
        filled[-1] += size
        assigned.append((tensor, f"{path.name}.data{len(filled)}"))
    return assigned
