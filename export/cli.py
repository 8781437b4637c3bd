"""``edge-export``: Keras run folder -> FP32 and INT8 ONNX models with a model card."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from edge_runtime.app.shell import (
    check_output_folder,
    command_parser,
    missing_extra,
    parse_args,
    run_command,
    share,
    whole_number,
)
from edge_runtime.app.status import ExitStatus
from training.console import command_logging, import_tensorflow

EXPORT_MODULES = ("tensorflow", "keras", "tf2onnx", "onnx")  # the export extra's
EXAMPLES = """\
examples:
  1. export a run (FP32 + INT8 + model card), checked by the parity gates:
       edge-export runs/lite0 --output runs/lite0/export
  2. a different file name and entropy calibration:
       edge-export runs/lite0 --output models --name busi-lite0 --calibration entropy
  3. add an FP16 model for CUDA / TensorRT hosts:
       edge-export runs/lite0 --output models --fp16

  4. the verified FP32 model alone (when the INT8 gate refuses a short training, say):
       edge-export runs/lite0 --output models --precision fp32

Writes <name>-fp32.onnx, <name>-int8.onnx, <name>.card.json and <name>.card.md, each model file
reloaded and checked as edge-classify runs it. If a parity gate fails (ONNX vs Keras, INT8 vs
FP32) it writes <name>.parity-failed.txt instead, no model, names what to try, and exits with
status 1. Next: edge-classify SCANS --model OUTPUT/<name>-int8.onnx
"""


def add_gate_arguments(parser: argparse.ArgumentParser) -> None:
    """``--min-agreement`` and ``--max-accuracy-drop``: the INT8/FP16 parity gate's bounds, for
    export and requantize alike, each refused at parse time outside its range."""
    from export.parity import MAX_ACCURACY_DROP, MIN_TOP1_AGREEMENT

    parser.add_argument(
        "--min-agreement",
        type=share(above_zero=True),
        default=MIN_TOP1_AGREEMENT,
        metavar="F",
        help="top-1 agreement with FP32 that INT8/FP16 must reach on held-out images, in (0, 1] "
        f"(default {MIN_TOP1_AGREEMENT}; recorded in the model card's parity results)",
    )
    parser.add_argument(
        "--max-accuracy-drop",
        type=share(),
        default=MAX_ACCURACY_DROP,
        metavar="F",
        help="largest accuracy loss of INT8/FP16 against FP32 on held-out images, in [0, 1] "
        f"(default {MAX_ACCURACY_DROP})",
    )


def add_float_convs_argument(parser: argparse.ArgumentParser, default: int) -> None:
    """``--float-convs N`` (N >= 0), for export and requantize alike."""
    parser.add_argument(
        "--float-convs",
        type=whole_number(0),
        default=default,
        metavar="N",
        help="keep the first N convolutions of each ensemble member, and the residual sums "
        f"among them, in float in the INT8 model (default {default}, the bundled model's); "
        "early rounding errors grow through the network, so this can lift INT8-FP32 agreement, "
        "and on EfficientNet-Lite 2 ran faster than 0",
    )


def file_stem(text: str) -> str:
    """``--name``: a plain file-name stem, which the model files' names start with."""
    if not text or text in {".", ".."} or any(c in text for c in "/\\\0"):
        raise argparse.ArgumentTypeError(
            f"must be a plain file-name stem, without a folder. Got {text!r} instead."
        )
    return text


def build_parser() -> argparse.ArgumentParser:
    """The parser; its defaults are :class:`export.quantize.QuantConfig`'s and the parity
    gates' (:mod:`export.parity`), the ones :class:`export.pipeline.ExportOptions` uses."""
    from export.quant_config import Calibration, IntType, QuantConfig

    defaults = QuantConfig()

    parser = command_parser(
        "edge-export",
        "Convert a trained model to ONNX and INT8, verified.",
        EXAMPLES,
        extra="export",
    )
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="an edge-train run folder")
    parser.add_argument("--output", type=Path, required=True, help="folder for the model files")
    parser.add_argument(
        "--name", type=file_stem, default="model", help="file name stem (default: model)"
    )
    parser.add_argument(
        "--precision",
        choices=["int8", "fp32"],
        default="int8",
        help="int8: FP32 and INT8 (default); fp32: the verified FP32 model alone, e.g. when the "
        "INT8 gate refuses",
    )
    parser.add_argument(
        "--calibration",
        choices=[*(c.value for c in Calibration), "auto"],
        default=defaults.calibration.value,
        help="INT8 calibration method; auto: try MinMax and Percentile 99.99/99.999/99.9999 and "
        "keep the one whose INT8 model agrees best with FP32 on the validation split (the gate "
        "is then measured on the test split)",
    )
    parser.add_argument(
        "--activations",
        choices=[t.value for t in IntType],
        default=defaults.activations.value,
        help=f"INT8 activation type (default {defaults.activations.value})",
    )
    parser.add_argument(
        "--calibration-images",
        type=whole_number(1),
        default=defaults.max_calibration_images,
        help=f"training images used for calibration (default {defaults.max_calibration_images})",
    )
    add_float_convs_argument(parser, defaults.float_convs)
    add_gate_arguments(parser)
    parser.add_argument(
        "--no-recheck",
        dest="recheck",
        action="store_false",
        help="gate the INT8 model alone. By default the INT8 model asks the runtime to rerun in "
        "FP32 the scans whose top-1 lead is below the largest INT8-FP32 change seen on the "
        "validation split (x2), and the gate scores those answers; use this when the device "
        "will run the INT8 file without its FP32 partner",
    )
    parser.add_argument(
        "--fp32-weights",
        choices=["float32", "float16"],
        default="float32",
        help="how <name>-fp32.onnx stores its convolution weights. float16: half the file, "
        "still float32 arithmetic (cast back in the graph, folded when the session opens); "
        "gated against the float32 weights (>= the INT8 gate's agreement, probabilities within "
        "1e-2, lesion Dice >= 0.99), and INT8 is quantized from it (default float32)",
    )
    parser.add_argument(
        "--fp16",
        action="store_true",
        help="also write <name>-fp16.onnx for GPU providers (checked against FP32 like INT8)",
    )
    return parser


def main(
    argv: Sequence[str] | None = None, *, stdout: TextIO | None = None, stderr: TextIO | None = None
) -> int:
    """``edge-export``; returns an :class:`~edge_runtime.app.status.ExitStatus`: ``GATE_FAILED`` (1)
    when a parity gate refused the model. The run folder is checked before TensorFlow loads."""
    stdout, stderr = stdout or sys.stdout, stderr or sys.stderr
    parser = build_parser()
    args = parse_args(parser, argv, stdout, stderr, lambda a: check_output_folder(parser, a.output))
    if isinstance(args, ExitStatus):
        return args
    missing = missing_extra("edge-export", "export", EXPORT_MODULES, stderr)
    if missing is not None:
        return missing
    with command_logging(stderr, quiet=args.quiet):
        return run_command(
            "edge-export",
            lambda: _export(args, stdout, stderr),
            stdout=stdout,
            stderr=stderr,
            traceback=args.traceback,
        )


def _export(args: argparse.Namespace, stdout: TextIO, stderr: TextIO) -> int:
    from training.runfolder import RunInfo

    RunInfo.read(args.run_dir)  # a wrong path fails here, before TensorFlow loads
    import_tensorflow()
    from edge_runtime.model.contract import Precision
    from export.pipeline import ExportOptions, ParityError, export_run
    from export.quant_config import Calibration, IntType, QuantConfig

    auto = args.calibration == "auto"
    options = ExportOptions(
        run_dir=args.run_dir,
        output_dir=args.output,
        name=args.name,
        quantization=QuantConfig(
            activations=IntType(args.activations),
            calibration=QuantConfig().calibration if auto else Calibration(args.calibration),
            max_calibration_images=args.calibration_images,
            float_convs=args.float_convs,
        ),
        fp16=args.fp16,
        min_agreement=args.min_agreement,
        max_accuracy_drop=args.max_accuracy_drop,
        choose_calibration=auto,
        recheck=args.recheck,
        precision=Precision(args.precision),
        fp32_half_weights=args.fp32_weights == "float16",
    )
    try:
        result = export_run(options)
    except ParityError as exc:
        _warn_thin(exc.reports)
        stderr.write(f"edge-export: {exc}\n")
        return ExitStatus.GATE_FAILED
    _warn_thin(result.reports)
    model = next(p for p in reversed(result.files) if p.name.endswith(("-int8.onnx", "-fp32.onnx")))
    print(f"Next: edge-classify SCANS --model {model}", file=stdout)
    return ExitStatus.SUCCESS


def _warn_thin(reports) -> None:
    from export.parity import thin_evidence

    for note in filter(None, map(thin_evidence, reports)):
        logging.getLogger("export").warning("%s", note)


if __name__ == "__main__":
    sys.exit(main())
