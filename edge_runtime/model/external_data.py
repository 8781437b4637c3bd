"""Model files whose weights lie in ONNX external-data files beside them.

ONNX stores an initializer outside the model file when its ``external_data`` names a
``location`` (a file), an ``offset`` and a ``length``; onnxruntime and ``onnx.load`` read them
relative to the model file's folder, as one model, when they are given the model file's path
(never its bytes). A bundled FP32 partner over the repository's file limit is stored so
(``export.bundle``). edge-classify reads only external-data files beside their model, so that
copying a model means copying the files :func:`external_data_files` lists.
"""

from __future__ import annotations

from pathlib import Path

from edge_runtime.model.contract import ContractError
from edge_runtime.model.onnx_meta import read_external_data_locations


def external_data_files(model_path: Path) -> list[Path]:
    """The external-data files ``model_path``'s initializers name, in the order they are
    named, each once; empty for a model whose weights all lie inside the file.

    Raises:
        OSError: the model file cannot be read.
        MetadataError: it is not an ONNX file.
        ContractError: a location is not a file name beside the model (a folder, a path).
    """
    files = []
    for location in read_external_data_locations(model_path):
        if location in ("", ".", "..") or "/" in location or "\\" in location:
            raise ContractError(
                f"{model_path}: names external data {location!r}, which is not a file beside "
                "it; edge-classify reads external-data files only from the model's own folder. "
                "Save the model with a plain file name as each tensor's location."
            )
        files.append(model_path.parent / location)
    return files


def require_external_data(model_path: Path) -> list[Path]:
    """:func:`external_data_files`, each checked to be there.

    Raises:
        FileNotFoundError: one is missing (named, with the model file).
        OSError, MetadataError, ContractError: as :func:`external_data_files`.
    """
    files = external_data_files(model_path)
    missing = [path.name for path in files if not path.is_file()]
    if missing:
        raise FileNotFoundError(
            f"{model_path}: its weights lie in {len(files)} external-data file(s) beside it "
            f"({', '.join(p.name for p in files)}), and {', '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} missing. Copy the model file together with "
            "every one of them."
        )
    return files
