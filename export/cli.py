"""``edge-export``: Keras run folder -> FP32 and INT8 ONNX models with a model card."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

EXAMPLES = """\
examples:
  1. export a run (FP32 + INT8 + model card), checked by the parity gates:
       edge-export runs/lite0 --output runs/lite0/export
  2. a different file name and entropy calibration:
       edge-export runs/lite0 --output models --name busi-lite0 --calibration entropy
  3. add an FP16 model for CUDA / TensorRT hosts:
       edge-export runs/lite0 --output models --fp16

Writes <name>-fp32.onnx, <name>-int8.onnx, <name>.card.json and <name>.card.md. If a parity gate
fails (ONNX vs Keras, INT8 vs FP32) it writes <name>.parity-failed.txt instead, no model, and
exits with status 1. Next: edge-classify SCANS --model OUTPUT/<name>-int8.onnx
"""


def build_parser() -> argparse.ArgumentParser:
    from export.quantize import Calibration, IntType

    parser = argparse.ArgumentParser(
        prog="edge-export",
        description="Convert a trained model to ONNX and INT8, verified.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="an edge-train run folder")
    parser.add_argument("--output", type=Path, required=True, help="folder for the model files")
    parser.add_argument("--name", default="model", help="file name stem (default: model)")
    parser.add_argument(
        "--calibration",
        choices=[*(c.value for c in Calibration), "auto"],
        default=Calibration.MINMAX.value,
        help="INT8 calibration method; auto: try MinMax and Percentile 99.99/99.999/99.9999 and "
        "keep the one whose INT8 model agrees best with FP32 on the validation split (the gate "
        "is then measured on the test split)",
    )
    parser.add_argument(
        "--activations",
        choices=[t.value for t in IntType],
        default=IntType.U8.value,
        help="INT8 activation type (default uint8)",
    )
    parser.add_argument(
        "--calibration-images", type=int, default=256, help="training images used for calibration"
    )
    parser.add_argument(
        "--float-convs",
        type=int,
        default=0,
        metavar="N",
        help="keep the first N convolutions, and the residual sums among them, in float in the "
        "INT8 model (default 0); early rounding errors grow through the network, so this can "
        "lift INT8-FP32 agreement at some speed",
    )
    parser.add_argument(
        "--min-agreement",
        type=float,
        default=0.99,
        metavar="F",
        help="top-1 agreement with FP32 that INT8/FP16 must reach on held-out images "
        "(default 0.99; recorded in the model card's parity results)",
    )
    parser.add_argument(
        "--max-accuracy-drop",
        type=float,
        default=0.01,
        metavar="F",
        help="largest accuracy loss of INT8/FP16 against FP32 on held-out images (default 0.01)",
    )
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
        "--fp16",
        action="store_true",
        help="also write <name>-fp16.onnx for GPU providers (checked against FP32 like INT8)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    from export.pipeline import ExportOptions, ParityError, export_run
    from export.quantize import Calibration, IntType, QuantConfig

    auto = args.calibration == "auto"
    options = ExportOptions(
        run_dir=args.run_dir,
        output_dir=args.output,
        name=args.name,
        quantization=QuantConfig(
            activations=IntType(args.activations),
            calibration=Calibration.MINMAX if auto else Calibration(args.calibration),
            max_calibration_images=args.calibration_images,
            float_convs=args.float_convs,
        ),
        fp16=args.fp16,
        min_agreement=args.min_agreement,
        max_accuracy_drop=args.max_accuracy_drop,
        choose_calibration=auto,
        recheck=args.recheck,
    )
    try:
        result = export_run(options)
    except ParityError as exc:
        print(f"edge-export: {exc}", file=sys.stderr)
        return 1
    except (FileNotFoundError, ValueError, PermissionError) as exc:
        print(f"edge-export: error: {exc}", file=sys.stderr)
        return 2
    print(f"Next: edge-classify SCANS --model {result.files[-1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
