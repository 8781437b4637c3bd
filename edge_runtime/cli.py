"""``edge-classify``: classify breast-ultrasound scans on this machine."""

from __future__ import annotations

import argparse
import contextlib
import difflib
import logging
import sys
from collections.abc import Sequence
from enum import IntEnum
from pathlib import Path
from typing import TextIO

from edge_runtime.classifier import Classifier, ClassifierOptions
from edge_runtime.contract import ContractError
from edge_runtime.output import OutputFormat, ResultWriter, write_heatmaps
from edge_runtime.session import Provider
from edge_runtime.sources import expand_sources


class ExitStatus(IntEnum):
    SUCCESS = 0  # every input classified
    PARTIAL = 1  # some inputs failed (each has its own error record)
    USAGE = 2  # bad arguments or an unusable model: nothing was classified


EXAMPLES = """\
examples:
  1. classify one scan with the bundled model:
       edge-classify scan.png
  2. a whole folder (recursive) to a CSV file:
       edge-classify /data/today --format csv --output today.csv
  3. your own exported model, FP32, with heatmaps:
       edge-classify scans/*.png --model run/export/model-fp32.onnx --heatmaps heat/
  4. flag uncertain results for review:
       edge-classify scans/ --abstain-below 0.7 --format jsonl

exit status: 0 all classified, 1 some inputs failed (see their error), 2 usage or model error.
Not a medical device: every result needs review by a qualified clinician.
"""


class _Parser(argparse.ArgumentParser):
    """argparse with "did you mean" for mistyped options (never silently corrected)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        options = [s for a in self._actions for s in a.option_strings]
        for word in message.split():
            if word.startswith("--"):
                close = difflib.get_close_matches(word.split("=")[0], options, n=1)
                if close:
                    message += f" (did you mean {close[0]}?)"
                    break
        super().error(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="edge-classify",
        description="Classify breast-ultrasound scans (normal / benign / malignant) with an "
        "edge-classify ONNX model.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "paths",
        nargs="+",
        metavar="PATH",
        help="image or DICOM files, folders (searched recursively) or globs",
    )
    parser.add_argument(
        "--model",
        default=None,
        help="ONNX model file, or 'int8' / 'fp32' for the bundled pair (default: bundled int8)",
    )
    parser.add_argument(
        "--format",
        choices=[f.value for f in OutputFormat],
        default="table",
        help="output format (default: table)",
    )
    parser.add_argument(
        "--output", type=Path, default=None, help="write results to this file instead of the screen"
    )
    parser.add_argument(
        "--heatmaps",
        type=Path,
        default=None,
        metavar="DIR",
        help="write <name>_heatmap.png and <name>_overlay.png per scan into DIR",
    )
    parser.add_argument(
        "--abstain-below",
        type=float,
        default=None,
        metavar="P",
        help="mark results with confidence below P as abstained "
        "(default: the model's own threshold)",
    )
    parser.add_argument("--batch-size", type=int, default=8, help="images per inference batch")
    parser.add_argument(
        "--threads", type=int, default=None, help="inference threads (default: one per core)"
    )
    parser.add_argument(
        "--provider",
        choices=[p.value for p in Provider],
        default="auto",
        help="execution provider (default: auto = TensorRT, CUDA, then CPU)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress or summary on stderr")
    parser.add_argument(
        "--traceback",
        action="store_true",
        help="show the full Python traceback on an error (for bug reports)",
    )
    return parser


def main(
    argv: Sequence[str] | None = None, *, stdout: TextIO | None = None, stderr: TextIO | None = None
) -> int:
    """Entry point; returns an :class:`ExitStatus`. Streams can be injected for tests."""
    stdout, stderr = stdout or sys.stdout, stderr or sys.stderr
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:
        return ExitStatus.SUCCESS if exit_.code == 0 else ExitStatus.USAGE
    logging.basicConfig(level=logging.WARNING, format="edge-classify: %(message)s", stream=stderr)
    try:
        return _classify(args, stdout, stderr)
    except (ContractError, FileNotFoundError, ValueError, PermissionError) as exc:
        if args.traceback:
            raise
        stderr.write(f"edge-classify: error: {exc}\n")
        return ExitStatus.USAGE


def _classify(args: argparse.Namespace, stdout: TextIO, stderr: TextIO) -> ExitStatus:
    files, problems = expand_sources(args.paths)
    for item, reason in problems:
        stderr.write(f"edge-classify: {item}: {reason}\n")
    options = ClassifierOptions(
        model_path=args.model,
        provider=Provider(args.provider),
        threads=args.threads,
        batch_size=args.batch_size,
        abstain_below=args.abstain_below,
    )
    with contextlib.ExitStack() as stack:
        classifier = stack.enter_context(Classifier.from_options(options))
        out = stack.enter_context(open(args.output, "w", newline="")) if args.output else stdout
        writer = ResultWriter(out, OutputFormat(args.format), classifier.spec.class_names)
        counts = _run(classifier, files, writer, args, stderr)
    failed = counts["failed"] + len(problems)
    if not args.quiet:
        stderr.write(
            f"edge-classify: {counts['ok']} classified, {counts['abstained']} abstained, "
            f"{failed} failed\n"
        )
    if failed:
        return ExitStatus.PARTIAL
    return ExitStatus.SUCCESS


def _run(
    classifier: Classifier,
    files: list[Path],
    writer: ResultWriter,
    args: argparse.Namespace,
    stderr: TextIO,
) -> dict[str, int]:
    counts = {"ok": 0, "failed": 0, "abstained": 0}
    show_progress = not args.quiet and stderr.isatty() and len(files) > 20
    for done, result in enumerate(classifier.iter_classify(files, heatmaps=bool(args.heatmaps)), 1):
        writer.write(result)
        counts["ok" if result.ok else "failed"] += 1
        counts["abstained"] += int(result.abstained)
        if args.heatmaps and result.ok:
            write_heatmaps([result], args.heatmaps)
        if show_progress:
            stderr.write(f"\r{done}/{len(files)} images")
    if show_progress:
        stderr.write("\n")
    return counts


if __name__ == "__main__":
    sys.exit(main())
