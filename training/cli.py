"""``edge-train``: train a classifier on ultrasound folders and write a run folder."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import shutil
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
)
from edge_runtime.app.status import ExitStatus
from training.console import command_logging, import_tensorflow
from training.model.backbones import (
    Backbone,
    check_lesion_input_size,
    has_pretrained_weights,
    lite_variant,
)
from training.recipe import DEFAULT
from training.runfolder import LOG_FILE, MODEL_FILE

TRAIN_MODULES = ("tensorflow", "keras", "sklearn", "scipy", "matplotlib")  # the train extra's
# numeric options: (lowest, highest or None, why); checked before TensorFlow loads
RANGES = {
    "jobs": (1, None, ""),
    "image_size": (16, 4096, ": the sides a model edge-classify runs may have"),
    "epochs": (0, None, ""),
    "frozen_epochs": (0, None, ""),
    "batch_size": (1, None, ""),
    "learning_rate": (0, None, " (0 picks one by a short search)"),
    "pixel_noise": (0, 1, ", a fraction of full scale"),
    "seg_weight": (0, None, ""),
    "seed": (0, 2**32 - 1, " (NumPy's and scikit-learn's seeds)"),
}

EXAMPLES = """\
examples:
  1. the bundled model's recipe on BUSI and BUS-BRA: EfficientNet-Lite0 and -Lite2 (ImageNet
     weights), one run each in runs/v4/members/, averaged into one graph in runs/v4:
       edge-train data/Dataset_BUSI_with_GT data/busbra --output runs/v4
  2. one model, with 5-fold grouped cross-validation first:
       edge-train data/Dataset_BUSI_with_GT --backbone efficientnet-lite0 --folds 5 --output runs/cv
     (add --cv-only to stop after the folds: cv_metrics.json, per source and per scanner)
  3. a quick smoke run on any <root>/<class>/*.png tree:
       edge-train my_scans --backbone small-cnn --weights none --image-size 96 --epochs 10 \\
           --output runs/smoke

  4. two machines train one model (run on each, with its own --worker-index; docs/scale-out.md):
       edge-train data/Dataset_BUSI_with_GT --backbone efficientnet-lite0 --output runs/lite0 \\
           --distributed --worker-hosts 10.0.0.1:12345,10.0.0.2:12345 --worker-index 0

DATA may be a BUSI release folder, a BUS-BRA folder, any <root>/<class>/ tree (sub-folders
too), or a manifest CSV (path,label[,group,patient,source,device,masks]; docs/usage.md). The run
folder gets model.keras, run.json, split.csv, history.csv, metrics.json, duplicates.csv,
train.log (everything logged, TensorFlow's messages included) and plots/; with several backbones
also members/, one such run folder per member, and the graph in RUN_DIR has no history.csv (it
is not trained).
Next step: edge-export RUN_DIR --output RUN_DIR/export
"""


def build_parser() -> argparse.ArgumentParser:
    parser = command_parser(
        "edge-train", "Train a breast-ultrasound classifier (Keras).", EXAMPLES, extra="train"
    )
    parser.add_argument("data", nargs="+", type=Path, metavar="DATA", help="dataset folders or CSV")
    parser.add_argument("--output", type=Path, required=True, help="run folder to write")
    parser.add_argument(
        "--backbone",
        nargs="+",
        choices=[b.value for b in Backbone],
        metavar="BACKBONE",
        help="feature extractor: one trains one model; several train one model each (in "
        "RUN/members/), with the same options and splits, averaged into one graph in RUN "
        f"(default: {' and '.join(DEFAULT.backbone)}, the bundled model's recipe; choices: "
        f"{', '.join(b.value for b in Backbone)})",
    )
    parser.add_argument(
        "--lesion-from",
        nargs="+",
        type=int,
        metavar="K",
        help="with several backbones: the members (1 = the first --backbone) whose lesion map "
        "draws the outline and decides 'normal' (default: "
        f"{' '.join(map(str, DEFAULT.lesion_from))}; the bundled model's larger member calls "
        "few of a new scanner's normal scans normal: docs/frontier.md)",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=2,
        metavar="N",
        help="with several backbones: members trained at once, each in a process of its own "
        "that logs to its member folder's train.log (default 2: on 2 cores the default pair "
        "took 54 min side by side against 69 one after the other; 1: one after the other). "
        "A member's models do not depend on it; one backbone ignores it",
    )
    parser.add_argument(
        "--weights",
        default="imagenet",
        help="'imagenet' (EfficientNet-Lite0/1/2: from the installed weights packages), "
        "a local weights file, or 'none' to train from scratch",
    )
    parser.add_argument(
        "--image-size",
        type=int,
        nargs="+",
        metavar="SIDE",
        help=f"model input side in pixels, 16 to 4096 (default {DEFAULT.image_size}); with the "
        "lesion head, a multiple of the backbone's deepest stride (32; small-cnn 16). With "
        "several backbones, one side for every member or one per --backbone (e.g. "
        "--backbone efficientnet-lite0 efficientnet-lite2 efficientnet-lite2 --image-size 160 "
        "160 256); the graph takes the largest and scales the scan down for the others",
    )
    parser.add_argument(
        "--epochs",
        type=int,
        default=DEFAULT.epochs,
        help=f"fine-tuning epochs (stage 2; default {DEFAULT.epochs}); 0 trains stage 1 alone. "
        "A backbone trained from scratch (--weights none; small-cnn) freezes nothing: it trains "
        "one stage of --frozen-epochs + --epochs epochs",
    )
    parser.add_argument(
        "--frozen-epochs",
        type=int,
        default=DEFAULT.frozen_epochs,
        help=f"epochs with the backbone frozen (stage 1; default {DEFAULT.frozen_epochs}); 0 "
        "skips it (not both 0). From scratch (--weights none; small-cnn) they are added to "
        "--epochs, in one stage",
    )
    parser.add_argument(
        "--batch-size", type=int, default=32, help="scans per training step (default 32)"
    )
    parser.add_argument(
        "--learning-rate",
        type=float,
        default=DEFAULT.learning_rate,
        help=f"stage-1 learning rate (default {DEFAULT.learning_rate}; 0 picks one by a short "
        "search)",
    )
    parser.add_argument(
        "--pixel-noise",
        type=float,
        default=DEFAULT.pixel_noise,
        metavar="SIGMA",
        help="largest std of the Gaussian pixel noise added in training, as a fraction of full "
        f"scale (default {DEFAULT.pixel_noise}; it makes the model, and so its INT8 export, "
        "stable)",
    )
    parser.add_argument(
        "--unmark",
        type=float,
        default=0.0,
        metavar="P",
        help="chance that a training scan is shown with its burned-in calipers and text painted "
        "out (python -m training.probes.marks), so that the model cannot lean on them (default 0)",
    )
    parser.add_argument(
        "--lesion-free-normals",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also train on both sides of each masked lesion scan mirrored "
        "(training.augmentation.lesion_free): the lesion-free side as normal, the lesion side as "
        "its class, so that the look of a source without normal scans does not mean 'not normal' "
        "(default: on when one source has normal scans and another has none)",
    )
    parser.add_argument(
        "--seg",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="train a lesion segmentation head with the classifier on the lesion masks (Dice + "
        "cross-entropy); normal scans and lesion-free views are taught an empty mask, lesion "
        "scans without a mask only the class; the exported model gains the 'lesion' output "
        "(default: on when any lesion scan has a mask)",
    )
    parser.add_argument(
        "--seg-weight",
        type=float,
        default=1.0,
        metavar="W",
        help="weight of the lesion mask loss beside the classification loss (default 1.0; 2.0 "
        "outlined a little better on one validation split, too little evidence to change the "
        "default: docs/experiments.md)",
    )
    parser.add_argument(
        "--clutter",
        type=float,
        default=DEFAULT.clutter,
        metavar="P",
        help="chance that a training scan, of any class, gets synthetic screen clutter painted "
        "on (calipers, dotted lines, text, body markers, rulers, logos: "
        "training.augmentation.clutter), so that such marks say nothing about the label "
        f"(default {DEFAULT.clutter})",
    )
    parser.add_argument(
        "--scanner-style",
        type=float,
        default=DEFAULT.scanner_style,
        metavar="P",
        help="chance of each scanner-style effect on a training scan (speckle, time-gain "
        "compensation, dynamic range, resolution, blur: training.augmentation.scanner_style), so "
        f"that how a scanner renders tissue says nothing about the label (default "
        f"{DEFAULT.scanner_style})",
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
        help="run K-fold grouped cross-validation, K >= 2, before the final model (default 0: "
        "none)",
    )
    parser.add_argument(
        "--cv-only",
        action="store_true",
        help="with --folds: write the cross-validation results (cv_metrics.json) and stop, "
        "without training the final model",
    )
    parser.add_argument(
        "--leave-scanner-out",
        nargs="*",
        metavar="SCANNER",
        default=None,
        help="the scanner-held-out protocol (training.evaluation.protocol): for each scanner "
        "(every one when none is named; names look like 'busi:GE LOGIQ E9' or "
        "'busbra:GE Logiq 5 @10-12MHz'), train on the others and test on it; writes "
        "protocol.json and protocol.md",
    )
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="train nothing: report again on the models the --output run already saved (its "
        "final model and scanner-held-out folds), with the same data and options; its "
        "--backbone, --lesion-from, --image-size and --seed are read from the run",
    )
    parser.add_argument(
        "--seed", type=int, help="split and initialisation seed, 0 to 2**32 - 1 (default 0)"
    )
    group = parser.add_argument_group(
        "multi-worker training", "one model trained by several machines (training.distributed)"
    )
    group.add_argument(
        "--distributed",
        action="store_true",
        help="train with tf.distribute.MultiWorkerMirroredStrategy: run the same command on "
        "every worker; the cluster comes from TF_CONFIG or --worker-hosts/--worker-index; the "
        "chief alone writes --output; --batch-size is the global batch",
    )
    group.add_argument(
        "--worker-hosts",
        dest="workers",
        default=None,
        metavar="HOST:PORT,...",
        help="with --distributed: every worker's address, in the same order on every worker",
    )
    group.add_argument(
        "--worker-index",
        type=int,
        default=None,
        metavar="I",
        help="with --worker-hosts: this worker's position in that list (0 is the chief)",
    )
    group.add_argument(
        "--backup-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="with --distributed: per-epoch backups for resuming after a worker fails "
        "(default: <output>.backup; deleted when the run completes)",
    )
    return parser


def main(
    argv: Sequence[str] | None = None, *, stdout: TextIO | None = None, stderr: TextIO | None = None
) -> int:
    """``edge-train``; returns an :class:`~edge_runtime.app.status.ExitStatus`.

    Arguments and DATA paths are checked before TensorFlow loads. A run that fails before it
    has trained anything removes the run folder it made.
    """
    stdout, stderr = stdout or sys.stdout, stderr or sys.stderr
    args = parse_arguments(argv, stdout, stderr)
    if isinstance(args, ExitStatus):
        return args
    lacking = missing_extra("edge-train", "train", TRAIN_MODULES, stderr)
    if lacking is not None:
        return lacking
    missing = [path for path in args.data if not path.exists()]
    if missing:
        stderr.write(
            f"edge-train: error: {missing[0]}: no such file or folder. DATA is a dataset folder "
            "(BUSI, BUS-BRA or <root>/<class>/*) or a CSV manifest "
            "(path,label[,group,patient,source,device,masks]).\n"
        )
        return ExitStatus.USAGE
    made_output = not args.output.exists()
    try:
        args.output.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        stderr.write(f"edge-train: error: --output {args.output}: {exc.strerror or exc}\n")
        return ExitStatus.USAGE
    with command_logging(stderr, args.output / LOG_FILE, quiet=args.quiet):
        status = run_command(
            "edge-train",
            lambda: _train(args, stdout),
            stdout=stdout,
            stderr=stderr,
            traceback=args.traceback,
        )
    if status != ExitStatus.SUCCESS and made_output and not any(args.output.rglob("*.keras")):
        shutil.rmtree(args.output, ignore_errors=True)
        stderr.write(f"edge-train: removed {args.output}: nothing was trained\n")
    return status


def parse_arguments(
    argv: Sequence[str] | None, stdout: TextIO, stderr: TextIO
) -> argparse.Namespace | ExitStatus:
    """``edge-train``'s arguments checked, with every option a run records filled in (from the
    recipe, or with ``--report-only`` from the run); or the status to exit with
    (:func:`~edge_runtime.app.shell.parse_args`)."""
    parser = build_parser()
    return parse_args(parser, argv, stdout, stderr, lambda a: _check(parser, a))


def _check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    check_output_folder(parser, args.output)
    lesion_from_given = args.lesion_from is not None
    _fill_recorded(parser, args)
    if lesion_from_given and len(args.backbone) == 1 and tuple(args.lesion_from) != (1,):
        parser.error(
            "--lesion-from picks among an ensemble's members; one --backbone has none to pick"
        )
    _check_members(parser, args)
    _check_numbers(parser, args)
    if args.cv_only and args.folds < 2 and args.leave_scanner_out is None:
        parser.error("--cv-only needs --folds K with K >= 2 or --leave-scanner-out")
    _check_weights(parser, args)
    if args.seg:
        try:
            for backbone, side in zip(args.backbone, args.member_sizes, strict=True):
                check_lesion_input_size(Backbone(backbone), side)
        except ValueError as exc:
            parser.error(str(exc))
    args.cluster = None
    if args.distributed:
        from training.distributed import cluster_from

        try:
            args.cluster = cluster_from(args.workers, args.worker_index)
        except ValueError as exc:
            parser.error(str(exc))
    elif args.workers or args.worker_index is not None or args.backup_dir:
        parser.error("--worker-hosts, --worker-index and --backup-dir need --distributed")


def _check_numbers(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Each numeric option within its range (NaN and infinity are in none), and some epochs."""
    for name in ("unmark", "clutter", "scanner_style"):
        value = getattr(args, name)
        if not 0.0 <= value <= 1.0:
            flag = "--" + name.replace("_", "-")
            parser.error(f"{flag} is a probability in [0, 1]. Got {value} instead.")
    for name, limits in RANGES.items():
        values = args.member_sizes if name == "image_size" else (getattr(args, name),)
        for value in values:
            _check_range(parser, name, value, limits)
    if args.folds == 1 or args.folds < 0:
        parser.error(
            f"--folds must be 0 (no cross-validation, the default) or K >= 2 folds. Got "
            f"{args.folds} instead."
        )
    if args.epochs == args.frozen_epochs == 0 and not args.report_only:
        parser.error("--epochs 0 with --frozen-epochs 0 trains nothing: give one of them 1 or more")


def _check_range(
    parser: argparse.ArgumentParser,
    name: str,
    value: float,
    limits: tuple[float, float | None, str],
) -> None:
    """Refuse ``value`` of option ``name`` outside ``limits`` (lowest, highest or None, why)."""
    low, high, why = limits
    if not (math.isfinite(value) and low <= value and (high is None or value <= high)):
        flag = "--" + name.replace("_", "-")
        bounds = f">= {low}" if high is None else f"{low} to {high}"
        parser.error(f"{flag} must be {bounds}{why}. Got {value} instead.")


def _fill_recorded(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Fill in the options a run records: with ``--report-only`` from ``--output``'s records (a
    named value that differs is refused: the report would describe another model), else from
    the recipe."""
    defaults = {
        "backbone": DEFAULT.backbone,
        "lesion_from": DEFAULT.lesion_from,
        "image_size": DEFAULT.image_size,
        "seed": 0,
    }
    if args.report_only:
        from training.ensemble import has_trained_model, recorded_options

        if not has_trained_model(args.output):
            parser.error(
                f"{args.output}: no saved model to report on (no {MODEL_FILE} in it, in its "
                "scanners/ or in its members/); train it first, without --report-only"
            )
        try:
            recorded = recorded_options(args.output)
        except ValueError as exc:
            parser.error(str(exc))
        for name, value in recorded.items():
            given = getattr(args, name)
            if name == "image_size" and given is not None:
                given = _sides(given) if len(set(given)) > 1 else given[0]
            if given is not None and (tuple(given) if isinstance(given, list) else given) != value:
                flag = "--" + name.replace("_", "-")
                shown = " ".join(map(str, value)) if isinstance(value, tuple) else value
                parser.error(
                    f"--report-only reports {args.output} as it was trained, with {flag} "
                    f"{shown}: leave {flag} out"
                )
            setattr(args, name, value)
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)


def _check_members(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Several ``--backbone``s train an ensemble: what one model alone can do is refused."""
    args.backbone = tuple(args.backbone)
    args.lesion_from = tuple(args.lesion_from)
    count = len(args.backbone)
    sizes = _sides(args.image_size)
    if len(sizes) not in (1, count):
        parser.error(
            f"--image-size takes one side for every member or one per --backbone ({count} "
            f"named). Got {len(sizes)} sides instead."
        )
    args.member_sizes = sizes * count if len(sizes) == 1 else sizes
    args.image_size = max(args.member_sizes)  # the graph's input side
    members = list(zip(args.backbone, args.member_sizes, strict=True))
    if len(set(members)) < count:
        later = next(k for k in range(count) if members[k] in members[:k])
        first = members.index(members[later])
        backbone, side = members[later]
        parser.error(
            f"--backbone names a backbone twice at one --image-size: members {first + 1} and "
            f"{later + 1} are both {backbone} at {side} px, so they would be the same model; "
            "name each once, or give each its own side"
        )
    lesion = args.lesion_from
    if len(set(lesion)) < len(lesion) or not all(1 <= k <= count for k in lesion):
        parser.error(
            f"--lesion-from takes each of the members 1 to {count} at most once, one member for "
            f"each backbone named. Got {' '.join(map(str, lesion))} instead."
        )
    if count == 1:
        return
    named = "the default trains" if args.backbone == DEFAULT.backbone else "--backbone names"
    one_model = {
        "--folds": args.folds > 0,
        "--distributed": args.distributed,
        "--weights FILE": args.weights.lower() not in ("imagenet", "none"),
    }
    for flag, given in one_model.items():
        if given:
            parser.error(
                f"{flag} works on one model: name one --backbone ({named} {count}: "
                f"{' and '.join(args.backbone)})"
            )


def _sides(image_size: int | Sequence[int]) -> tuple[int, ...]:
    """``--image-size``'s sides as a tuple: one for every member, or one per member."""
    return (image_size,) if isinstance(image_size, int) else tuple(image_size)


def _check_weights(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """``--weights`` as the backbones can take them: 'imagenet' (any case) where each has
    ImageNet weights, 'none', or a weights file that exists, for one backbone that can start
    from one (small-cnn always trains from scratch)."""
    if args.weights.lower() in ("imagenet", "none"):
        args.weights = args.weights.lower()
    if args.report_only:  # trains nothing: the run's models are read
        return
    untrained = [b for b in args.backbone if not has_pretrained_weights(Backbone(b))]
    if untrained and args.weights == "imagenet":
        parser.error(f"{' and '.join(untrained)} has no ImageNet weights: add --weights none")
    if args.weights in ("imagenet", "none"):
        return
    if untrained:  # one backbone here: a file for several is refused by _check_members
        parser.error(
            f"--weights {args.weights}: {untrained[0]} takes no weights, it always trains from "
            "scratch: pass --weights none"
        )
    path = Path(args.weights)
    if not path.is_file():
        found = "is a folder, not a weights file" if path.is_dir() else "no such file"
        kind = (
            "a PyTorch EfficientNet-Lite state dict (.pth)"
            if lite_variant(Backbone(args.backbone[0])) is not None
            else "a Keras .h5 or .weights.h5 file"
        )
        parser.error(
            f"--weights {args.weights}: {found}. --weights takes 'imagenet', 'none' (train from "
            f"scratch) or the path of an existing weights file: for {args.backbone[0]}, {kind}"
        )


def _train(args: argparse.Namespace, stdout: TextIO) -> int:
    import_tensorflow()
    from training.augmentation.augment import AugmentConfig
    from training.distributed import stage_callbacks, start
    from training.fit import FitConfig
    from training.run import TrainConfig, report_saved, train

    cluster = args.cluster
    config = TrainConfig(
        data=tuple(args.data),
        output=args.output,
        backbone=Backbone(args.backbone[0]),
        weights=None if args.weights == "none" else args.weights,
        input_size=args.image_size,
        folds=args.folds,
        final_model=not args.cv_only,
        seed=args.seed,
        int8_grid=args.int8_grid,
        lesion_free_normals=args.lesion_free_normals,
        segmentation=args.seg,
        leave_scanner_out=()
        if args.leave_scanner_out is None
        else tuple(args.leave_scanner_out) or ("all",),
        fit=FitConfig(
            epochs_frozen=args.frozen_epochs,
            epochs_finetune=args.epochs,
            batch_size=args.batch_size,
            learning_rate=args.learning_rate or None,
            seed=args.seed,
            augment=AugmentConfig(
                noise=args.pixel_noise,
                unmark=args.unmark,
                clutter=args.clutter,
                scanner_style=args.scanner_style,
            ),
            seg_weight=args.seg_weight,
            extra_callbacks=None if cluster is None else stage_callbacks,
        ),
    )
    if len(args.backbone) > 1:
        from training.ensemble import train_ensemble

        members = [Backbone(b) for b in args.backbone]
        lesion_from = [k - 1 for k in args.lesion_from]
        train_ensemble(
            config,
            members,
            lesion_from,
            input_sizes=args.member_sizes,
            report_only=args.report_only,
            jobs=args.jobs,
            quiet=args.quiet,
        )
    elif args.report_only:
        report_saved(config)
    else:
        with contextlib.ExitStack() as stack:
            if cluster is not None:
                output = stack.enter_context(start(cluster, args.output, args.backup_dir))
                config = dataclasses.replace(config, output=output)
            train(config)
    if args.report_only:
        return ExitStatus.SUCCESS
    if cluster is not None and not cluster.is_chief:
        print(f"{cluster.name} done; the chief wrote the run folder", file=stdout)
        return ExitStatus.SUCCESS
    if args.leave_scanner_out is not None:
        print(f"Scanner-held-out protocol: {args.output / 'protocol.md'}", file=stdout)
    if args.cv_only and args.folds > 1:
        print(f"Cross-validation results: {args.output / 'cv_metrics.json'}", file=stdout)
    if not args.cv_only:
        print(f"Next: edge-export {args.output} --output {args.output / 'export'}", file=stdout)
    return ExitStatus.SUCCESS


if __name__ == "__main__":
    sys.exit(main())
