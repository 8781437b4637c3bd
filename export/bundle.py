"""Put an exported run into the package as the bundled default model, with what users need.

usage: python -m export.bundle RUN_DIR --data-root ../shared/data

Copies ``RUN_DIR/export/default-{fp32,int8}.onnx`` and the card into ``edge_runtime/models/``,
writes ``default.heldout.csv`` (the run's test images, paths relative to ``--data-root``, so the
benchmarks can re-check parity on a machine that has the data), and copies the run's plots and
metrics and its scanner-held-out protocol (``protocol.json``) into ``docs/default-model/``. An
FP32 file over :data:`MAX_FILE_BYTES` is bundled with its weights in ONNX external-data files
beside it (``default-fp32.onnx.data1``, ...), none over that, and its card record says so.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from edge_runtime.classifier import MODELS_DIR
from edge_runtime.model.card import file_record
from edge_runtime.model.contract import ContractError
from edge_runtime.model.external_data import external_data_files
from edge_runtime.model.session import Provider, open_model, open_recheck_model
from export.card import write_card
from export.external_data import split_external_data
from training.runfolder import (
    CV_METRICS_FILE,
    METRICS_FILE,
    PLOTS_DIR,
    PROTOCOL_FILE,
    SOURCE_METRICS_FILE,
    SPLIT_FILE,
)

NAME = "default"
DOCS_DIR = Path(__file__).resolve().parents[1] / "docs" / "default-model"
MAX_INT8_BYTES = 16 * 1000 * 1000  # issue 33's budget for the bundled INT8 files
# The repository commits no file over 20 MB; an FP32 file over it is split into external-data
# files (`edge-export --fp32-weights float16` halves it first)
MAX_FILE_BYTES = 20 * 1000 * 1000


def bundle(
    run_dir: Path, data_root: Path, models_dir: Path = MODELS_DIR, docs_dir: Path = DOCS_DIR
) -> list[Path]:
    """Copy the model pair (the FP32 file split when it is over :data:`MAX_FILE_BYTES`), card,
    held-out list and reports; returns the files written.

    Raises:
        FileNotFoundError: the run has no exported default model.
        ValueError: a file is over 20 MB (for the FP32 file: one of its initializers, or its
            graph), the INT8 model is over 16 MB, or a held-out path is not under
            ``data_root``; nothing is copied.
    """
    export = run_dir / "export"
    fp32, int8 = (export / f"{NAME}-{p}.onnx" for p in ("fp32", "int8"))
    cards = [export / f"{NAME}.card.json", export / f"{NAME}.card.md"]
    for path in (fp32, int8, *cards):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing; run `edge-export {run_dir} --name {NAME}`")
    _check_sizes([int8, *cards])
    if int8.stat().st_size > MAX_INT8_BYTES:
        raise ValueError(
            f"{int8}: {int8.stat().st_size:,} bytes, over the {MAX_INT8_BYTES / 1e6:.0f} MB budget"
        )
    with tempfile.TemporaryDirectory(prefix="edge-classify-bundle-") as tmp:
        files = [fp32, int8, *cards]
        if fp32.stat().st_size > MAX_FILE_BYTES:
            files = [*_split_fp32(fp32, cards[0], Path(tmp)), int8]
        _check_sizes(files)
        models_dir.mkdir(parents=True, exist_ok=True)
        written = _copy(files, models_dir)
    for path in (models_dir / fp32.name, models_dir / int8.name):
        try:
            open_recheck_model(open_model(path, provider=Provider.CPU), provider=Provider.CPU)
        except ContractError as exc:
            raise ValueError(f"{path}: bundled model fails the contract: {exc}") from exc
    written.append(_write_heldout(run_dir / SPLIT_FILE, data_root, models_dir))
    docs_dir.mkdir(parents=True, exist_ok=True)
    reports = [
        run_dir / name
        for name in (METRICS_FILE, CV_METRICS_FILE, SOURCE_METRICS_FILE, PROTOCOL_FILE)
    ]
    for path in [*sorted((run_dir / PLOTS_DIR).glob("*.png")), *reports]:
        if path.is_file():
            shutil.copy2(path, docs_dir / path.name)
            written.append(docs_dir / path.name)
    return written


def _check_sizes(files: Sequence[Path]) -> None:
    """Raises ValueError: a file is over :data:`MAX_FILE_BYTES`."""
    for path in files:
        if path.stat().st_size > MAX_FILE_BYTES:
            raise ValueError(
                f"{path}: {path.stat().st_size:,} bytes, over the {MAX_FILE_BYTES / 1e6:.0f} MB "
                "a committed file may have"
            )


def _split_fp32(fp32: Path, card_json: Path, staging: Path) -> list[Path]:
    """The FP32 model copied into ``staging`` with its weights in external-data files of at
    most :data:`MAX_FILE_BYTES`, and the card (JSON and Markdown) with that file's record
    rewritten: the files to bundle in place of ``fp32`` and the card.

    Raises:
        ValueError: an initializer, or the graph, is over :data:`MAX_FILE_BYTES`.
    """
    staged = staging / fp32.name
    shutil.copy2(fp32, staged)
    pieces = split_external_data(staged, MAX_FILE_BYTES)
    card = json.loads(card_json.read_text())
    card["files"][fp32.name] = file_record(staged)
    return [staged, *pieces, *write_card(card, staging)]


def _copy(files: Sequence[Path], models_dir: Path) -> list[Path]:
    """Copy ``files`` into ``models_dir``, first removing the external-data files of the model
    files they replace (a model bundled split before); returns the copies."""
    for path in files:
        target = models_dir / path.name
        if path.suffix == ".onnx" and target.is_file():
            for stale in external_data_files(target):
                stale.unlink(missing_ok=True)
    written = []
    for path in files:
        target = models_dir / path.name
        shutil.copy2(path, target)
        written.append(target)
    return written


def _write_heldout(manifest: Path, data_root: Path, models_dir: Path) -> Path:
    root = data_root.resolve()
    target = models_dir / f"{NAME}.heldout.csv"
    with open(manifest, newline="") as handle, open(target, "w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["path", "label", "source"])
        for row in csv.DictReader(handle):
            if row["split"] != "test":
                continue
            path = Path(row["path"]).resolve()
            if not path.is_relative_to(root):
                raise ValueError(f"{manifest}: test image {path} is not under {root}")
            writer.writerow([path.relative_to(root).as_posix(), row["label"], row.get("source")])
    return target


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export.bundle", description=__doc__)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--data-root", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        for path in bundle(args.run_dir, args.data_root):
            print(f"wrote {path}")
    except (FileNotFoundError, ValueError) as exc:
        print(f"bundle: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
