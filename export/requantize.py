"""Quantize an exported model's INT8 file again from its FP32 file, gated, its card updated.

usage: python -m export.requantize MODEL_DIR --split-dir RUN_DIR --data-root DATA
           [--name NAME] [--float-convs N] [--min-agreement F] [--max-accuracy-drop F]

``NAME`` is the model files' stem (``model`` for ``model-int8.onnx``, what ``edge-export``
writes; ``default`` for the bundled model); without it, the one model whose card is in MODEL_DIR.

For a model whose run folder is gone (the bundled default model): ``RUN_DIR`` holds the
``split.csv`` of the model's own split (a rerun of its recipe with the same data and seed writes
the same one; the held-out rows are checked against ``<name>.heldout.csv``). The FP32 file and
every measurement of the card stay; see :func:`export.pipeline.requantize_export`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from edge_runtime.app.status import ExitStatus
from edge_runtime.model.card import CARD_SUFFIX


def main(argv: Sequence[str] | None = None) -> int:
    from export.cli import add_float_convs_argument, add_gate_arguments, file_stem
    from export.quant_config import QuantConfig

    parser = argparse.ArgumentParser(prog="python -m export.requantize", description=__doc__)
    parser.add_argument("model_dir", type=Path, metavar="MODEL_DIR")
    parser.add_argument("--split-dir", type=Path, required=True, help="holds the split.csv")
    parser.add_argument("--data-root", type=Path, required=True)
    parser.add_argument(
        "--name",
        type=file_stem,
        help="the model files' stem, e.g. model for model-int8.onnx (default: the one model "
        "whose card is in MODEL_DIR)",
    )
    add_float_convs_argument(parser, QuantConfig().float_convs)
    add_gate_arguments(parser)
    args = parser.parse_args(argv)
    if args.name is None:
        args.name = _only_model(parser, args.model_dir)
    from export.pipeline import ParityError, requantize_export  # after the usage errors

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    config = QuantConfig(float_convs=args.float_convs)
    try:
        result = requantize_export(
            args.model_dir,
            args.name,
            args.split_dir,
            args.data_root,
            config,
            min_agreement=args.min_agreement,
            max_accuracy_drop=args.max_accuracy_drop,
        )
    except (FileNotFoundError, ValueError) as exc:
        print(f"requantize: error: {exc}", file=sys.stderr)
        return ExitStatus.USAGE
    except ParityError as exc:
        print(f"requantize: {exc}", file=sys.stderr)
        return ExitStatus.GATE_FAILED
    print(f"wrote {result.files[0]} and {result.card}")
    return ExitStatus.SUCCESS


def _only_model(parser: argparse.ArgumentParser, model_dir: Path) -> str:
    """The stem of the one model whose card is in ``model_dir``; a usage error otherwise."""
    names = sorted(p.name.removesuffix(CARD_SUFFIX) for p in model_dir.glob(f"*{CARD_SUFFIX}"))
    if len(names) != 1:
        found = f"models {', '.join(names)}" if names else f"no model card (*{CARD_SUFFIX})"
        parser.error(f"{model_dir}: {found}; name the model with --name")
    return names[0]


if __name__ == "__main__":
    sys.exit(main())
