"""``edge-train``: train a classifier on ultrasound folders and write a run folder."""

from __future__ import annotations

import argparse
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from edge_runtime.status import ExitStatus
from training.console import (
    add_traceback_option,
    command_logging,
    import_tensorflow,
    parse_args,
    run_command,
)

LOG_FILE = "train.log"

EXAMPLES = """\
examples:
  1. EfficientNet-Lite0 (ImageNet weights) on BUSI and BUS-BRA:
       edge-train data/Dataset_BUSI_with_GT data/busbra --output runs/lite0
  2. 5-fold grouped cross-validation first, then the final model:
       edge-train data/Dataset_BUSI_with_GT --folds 5 --output runs/cv
     (add --cv-only to stop after the folds: cv_metrics.json, per source and per scanner)
  3. a quick smoke run on any <root>/<class>/*.png tree:
       edge-train my_scans --backbone small-cnn --weights none --image-size 96 --epochs 10 \\
           --output runs/smoke

DATA may be a BUSI release folder, a BUS-BRA folder, any <root>/<class>/ tree, or a manifest CSV
(path,label[,group]). The run folder gets model.keras, run.json, split.csv, history.csv,
metrics.json, duplicates.csv, train.log (everything logged, TensorFlow's messages
included) and plots/. Next step: edge-export RUN_DIR --output RUN_DIR/export
"""


def build_parser() -> argparse.ArgumentParser:
    from training.backbones import Backbone

    parser = argparse.ArgumentParser(
        prog="edge-train",
        description="Train a breast-ultrasound classifier (Keras).",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("data", nargs="+", type=Path, metavar="DATA", help="dataset folders or CSV")
    parser.add_argument("--output", type=Path, required=True, help="run folder to write")
    parser.add_argument(
        "--backbone",
        choices=[b.value for b in Backbone],
        default=Backbone.EFFICIENTNET_LITE0.value,
        help="feature extractor",
    )
    parser.add_argument(
        "--weights",
        default="imagenet",
        help="'imagenet' (EfficientNet-Lite0: from the installed weights package), "
        "a local weights file, or 'none' to train from scratch",
    )
    parser.add_argument("--image-size", type=int, default=224, help="model input side in pixels")
    parser.add_argument("--epochs", type=int, default=20, help="fine-tuning epochs (stage 2)")
    parser.add_argument(
        "--frozen-epochs", type=int, default=4, help="epochs with the backbone frozen (stage 1)"
    )
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--learning-rate",
        type=float,
        default=None,
        help="stage-1 learning rate (default: pick by a short search)",
    )
    parser.add_argument(
        "--pixel-noise",
        type=float,
        default=None,
        metavar="SIGMA",
        help="largest std of the Gaussian pixel noise added in training, as a fraction of full "
        "scale (default 0.03; it makes the model, and so its INT8 export, stable)",
    )
    parser.add_argument(
        "--unmark",
        type=float,
        default=0.0,
        metavar="P",
        help="chance that a training scan is shown with its burned-in calipers and text painted "
        "out (python -m training.marks), so that the model cannot lean on them (default 0)",
    )
    parser.add_argument(
        "--lesion-free-normals",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also train on both sides of each masked lesion scan mirrored (python -m "
        "training.lesionfree): the lesion-free side as normal, the lesion side as its class, "
        "so that the look of a source without normal scans does not mean 'not normal' "
        "(default: on when one source has normal scans and another has none)",
    )
    parser.add_argument(
        "--no-int8-grid",
        dest="int8_grid",
        action="store_false",
        help="keep the trained kernels as they are; by default they are rounded to the INT8 "
        "grid that edge-export uses, so the FP32 and INT8 exports share their weights",
    )
    parser.add_argument(
        "--folds",
        type=int,
        default=0,
        help="run K-fold grouped cross-validation before the final model",
    )
    parser.add_argument(
        "--cv-only",
        action="store_true",
        help="with --folds: write the cross-validation results (cv_metrics.json) and stop, "
        "without training the final model",
    )
    parser.add_argument("--seed", type=int, default=0)
    add_traceback_option(parser)
    return parser


def main(
    argv: Sequence[str] | None = None, *, stdout: TextIO | None = None, stderr: TextIO | None = None
) -> int:
    """``edge-train``; returns an :class:`~edge_runtime.status.ExitStatus`.

    Arguments and DATA paths are checked before TensorFlow loads. A run that fails before it
    has trained anything removes the run folder it made.
    """
    stdout, stderr = stdout or sys.stdout, stderr or sys.stderr
    parser = build_parser()
    args = parse_args(parser, argv, stdout, stderr, lambda a: _check(parser, a))
    if isinstance(args, ExitStatus):
        return args
    missing = [path for path in args.data if not path.exists()]
    if missing:
        stderr.write(
            f"edge-train: error: {missing[0]}: no such file or folder. DATA is a dataset folder "
            "(BUSI, BUS-BRA or <root>/<class>/*) or a CSV manifest (path,label[,group]).\n"
        )
        return ExitStatus.USAGE
    made_output = not args.output.exists()
    with command_logging(stderr, args.output / LOG_FILE):
        status = run_command(
            "edge-train", lambda: _train(args, stdout), stderr=stderr, traceback=args.traceback
        )
    if status != ExitStatus.SUCCESS and made_output and not any(args.output.rglob("*.keras")):
        shutil.rmtree(args.output, ignore_errors=True)
        stderr.write(f"edge-train: removed {args.output}: nothing was trained\n")
    return status


def _check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.cv_only and args.folds < 2:
        parser.error("--cv-only needs --folds K with K >= 2")
    if not 0.0 <= args.unmark <= 1.0:
        parser.error(f"--unmark is a probability in [0, 1]. Got {args.unmark} instead.")


def _train(args: argparse.Namespace, stdout: TextIO) -> int:
    import_tensorflow()
    from training.augment import AugmentConfig
    from training.backbones import Backbone
    from training.fit import FitConfig
    from training.run import TrainConfig, train

    noise = {} if args.pixel_noise is None else {"noise": args.pixel_noise}
    config = TrainConfig(
        data=tuple(args.data),
        output=args.output,
        backbone=Backbone(args.backbone),
        weights=None if args.weights.lower() == "none" else args.weights,
        input_size=args.image_size,
        folds=args.folds,
        final_model=not args.cv_only,
        seed=args.seed,
        int8_grid=args.int8_grid,
        lesion_free_normals=args.lesion_free_normals,
        fit=FitConfig(
            epochs_frozen=args.frozen_epochs,
            epochs_finetune=args.epochs,
            batch_size=args.batch_size,
            learning_rate=args.learning_rate,
            seed=args.seed,
            augment=AugmentConfig(**noise, unmark=args.unmark),
        ),
    )
    train(config)
    if args.cv_only:
        print(f"Cross-validation results: {args.output / 'cv_metrics.json'}", file=stdout)
    else:
        print(f"Next: edge-export {args.output} --output {args.output / 'export'}", file=stdout)
    return ExitStatus.SUCCESS


if __name__ == "__main__":
    sys.exit(main())
