"""``edge-classify``: classify breast-ultrasound scans on this machine."""

from __future__ import annotations

import argparse
import contextlib
import difflib
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from edge_runtime.classifier import Classifier, ClassifierOptions
from edge_runtime.contract import ContractError
from edge_runtime.output import OutputFormat, ResultWriter, heatmap_stems, write_heatmaps
from edge_runtime.session import Provider
from edge_runtime.sources import expand_sources
from edge_runtime.status import ExitStatus

SUBCOMMANDS = ("watch", "bench")


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
  5. classify scans as they arrive in a folder (see: edge-classify watch --help):
       edge-classify watch /data/incoming --output results.jsonl
  6. measure speed on this machine (see: edge-classify bench --help):
       edge-classify bench --model model-int8.onnx --batch-sizes 1,8

"watch" and "bench" as the first word are subcommands; to classify a file or folder with one of
those names, write it as a path: edge-classify ./watch

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


WATCH_EXAMPLES = """\
examples:
  1. classify every scan that arrives in a folder (Ctrl-C stops after the current batch):
       edge-classify watch /data/incoming --output results.jsonl
  2. your own model, poll every 5 s, a file is ready after 10 s without change:
       edge-classify watch /data/incoming --output results.jsonl --model model-int8.onnx \\
         --interval 5 --settle 10
  3. from a script or cron job: classify what is there now, then exit:
       edge-classify watch /data/incoming --output results.jsonl --once

Each scan (or DICOM frame) gets one JSON line in the output, appended and fsync'ed batch by
batch. Processed files are remembered in the state file (default: <output>.state.json) and in the
output itself, so a restart, even after a crash or power cut, skips them: nothing is classified
twice and nothing is lost. A file that changes (new size or time) is classified again.

exit status: 0 stopped cleanly (SIGINT/SIGTERM) or --once with every scan classified,
1 --once with some scans failed (see their error), 2 usage or model error.
"""

BENCH_EXAMPLES = """\
examples:
  1. the bundled model, batch 1 and 8, one thread (the default, for repeatable numbers):
       edge-classify bench
  2. compare FP32 and INT8 exports as JSON:
       edge-classify bench --model export/model-fp32.onnx --format json
       edge-classify bench --model export/model-int8.onnx --format json
  3. your own scans, more runs, two threads:
       edge-classify bench --images scans/ --runs 200 --threads 2 --batch-sizes 1,4,16

Times preprocessing (fit into the model's square + stack), inference and postprocessing
separately; latency is the inference time of one batch. Synthetic 480x640 scans unless --images.
"""


def _add_model_options(parser: argparse.ArgumentParser, *, threads_default: int | None) -> None:
    parser.add_argument(
        "--model",
        default=None,
        help="ONNX model file, or 'int8' / 'fp32' for the bundled pair (default: the bundled "
        "INT8 model; FP32 where onnxruntime's CUDA provider runs it, which has no INT8 kernels)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=threads_default,
        help="inference threads (default: "
        + ("one per core" if threads_default is None else str(threads_default))
        + ")",
    )
    parser.add_argument(
        "--provider",
        choices=[p.value for p in Provider],
        default="auto",
        help="execution provider (default: auto = TensorRT, CUDA, then CPU)",
    )
    parser.add_argument(
        "--no-recheck",
        dest="recheck",
        action="store_false",
        help="run an INT8 model alone: do not rerun in FP32 the scans it is unsure of (its "
        "metadata names the FP32 file, which must lie beside it; see the model card for the "
        "agreement with FP32 either way)",
    )


def _add_common_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quiet", action="store_true", help="no progress or summary on stderr")
    parser.add_argument(
        "--traceback",
        action="store_true",
        help="show the full Python traceback on an error (for bug reports)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``edge-classify PATH...`` (the subcommands have their own)."""
    parser = _Parser(
        prog="edge-classify",
        description="Classify breast-ultrasound scans (normal / benign / malignant) with an "
        "edge-classify ONNX model. Subcommands: watch (a folder, as scans arrive), "
        "bench (speed on this machine).",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "paths",
        nargs="+",
        metavar="PATH",
        help="image or DICOM files, folders (searched recursively) or globs",
    )
    _add_model_options(parser, threads_default=None)
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
        help="write <name>_heatmap.png and <name>_overlay.png per scan into DIR "
        "(names shared by two inputs get a short hash of the path added)",
    )
    _add_abstain_option(parser)
    parser.add_argument("--batch-size", type=int, default=8, help="images per inference batch")
    _add_common_options(parser)
    return parser


def _add_abstain_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--abstain-below",
        type=float,
        default=None,
        metavar="P",
        help="mark results with confidence below P as abstained "
        "(default: the model's own threshold)",
    )


def build_watch_parser() -> argparse.ArgumentParser:
    """The parser of ``edge-classify watch``."""
    parser = _Parser(
        prog="edge-classify watch",
        description="Classify scans as they appear in a folder (searched recursively), one "
        "JSON line each, exactly once across restarts.",
        epilog=WATCH_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("directory", type=Path, metavar="DIR", help="the folder to watch")
    parser.add_argument(
        "--output",
        type=Path,
        required=True,
        metavar="FILE.jsonl",
        help="JSON-lines file the records are appended to (created if missing)",
    )
    _add_model_options(parser, threads_default=None)
    parser.add_argument(
        "--interval", type=float, default=2.0, metavar="S", help="seconds between polls (default 2)"
    )
    parser.add_argument(
        "--settle",
        type=float,
        default=2.0,
        metavar="S",
        help="a file is ready once its size and time are unchanged for S seconds (default 2)",
    )
    parser.add_argument(
        "--state",
        type=Path,
        default=None,
        metavar="FILE",
        help="where processed files are remembered (default: <output>.state.json)",
    )
    parser.add_argument(
        "--once", action="store_true", help="classify what is there (once settled), then exit"
    )
    parser.add_argument("--batch-size", type=int, default=8, help="images per inference batch")
    _add_abstain_option(parser)
    _add_common_options(parser)
    return parser


def build_bench_parser() -> argparse.ArgumentParser:
    """The parser of ``edge-classify bench``."""
    parser = _Parser(
        prog="edge-classify bench",
        description="Measure a model's latency and throughput on this machine.",
        epilog=BENCH_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_model_options(parser, threads_default=1)
    parser.add_argument(
        "--batch-sizes",
        type=_int_list,
        default=(1, 8),
        metavar="N,N",
        help="comma-separated batch sizes (default 1,8)",
    )
    parser.add_argument(
        "--runs", type=int, default=50, help="timed runs per batch size (default 50)"
    )
    parser.add_argument(
        "--warmup", type=int, default=5, help="untimed runs per batch size first (default 5)"
    )
    parser.add_argument(
        "--images",
        type=Path,
        default=None,
        metavar="DIR",
        help="time on these scans (a folder or file) instead of synthetic 480x640 ones",
    )
    parser.add_argument(
        "--format",
        choices=["table", "json"],
        default="table",
        help="output format (default: table)",
    )
    _add_common_options(parser)
    return parser


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        values = ()
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(
            f"must be positive integers separated by commas, like 1,8. Got {text!r} instead."
        )
    return values


def main(
    argv: Sequence[str] | None = None, *, stdout: TextIO | None = None, stderr: TextIO | None = None
) -> int:
    """Entry point; returns an :class:`ExitStatus`. Streams can be injected for tests.

    ``watch`` or ``bench`` as the first argument selects that subcommand; anything else is
    ``edge-classify PATH...``.
    """
    stdout, stderr = stdout or sys.stdout, stderr or sys.stderr
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv and argv[0] in SUBCOMMANDS else None
    builders = {None: build_parser, "watch": build_watch_parser, "bench": build_bench_parser}
    bodies = {None: _classify, "watch": _watch, "bench": _bench}
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            args = builders[command]().parse_args(argv[1:] if command else argv)
    except SystemExit as exit_:
        return ExitStatus.SUCCESS if exit_.code == 0 else ExitStatus.USAGE
    _configure_logging(stderr, quiet=args.quiet)
    try:
        return bodies[command](args, stdout, stderr)
    except BrokenPipeError:  # e.g. `edge-classify scans/ | head`: stop quietly
        if stdout is sys.__stdout__:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.__stdout__.fileno())
        return ExitStatus.PARTIAL
    except KeyboardInterrupt:
        return ExitStatus.INTERRUPTED
    except (ContractError, ValueError, OSError) as exc:
        if args.traceback:
            raise
        stderr.write(f"edge-classify: error: {exc}\n")
        return ExitStatus.USAGE


def _configure_logging(stream: TextIO, *, quiet: bool) -> None:
    logger = logging.getLogger("edge_runtime")
    for handler in list(logger.handlers):
        if getattr(handler, "_edge_classify_cli", False):
            logger.removeHandler(handler)
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("edge-classify: %(message)s"))
    handler._edge_classify_cli = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    logger.setLevel(logging.ERROR if quiet else logging.WARNING)
    logger.propagate = False


def _options(args: argparse.Namespace) -> ClassifierOptions:
    return ClassifierOptions(
        model_path=args.model,
        provider=Provider(args.provider),
        threads=args.threads,
        batch_size=getattr(args, "batch_size", 8),
        abstain_below=getattr(args, "abstain_below", None),
        recheck=args.recheck,
    )


def _classify(args: argparse.Namespace, stdout: TextIO, stderr: TextIO) -> ExitStatus:
    files, problems = expand_sources(args.paths)
    for item, reason in problems:
        hint = difflib.get_close_matches(str(item), SUBCOMMANDS, n=1)
        hint_text = f" (did you mean the subcommand '{hint[0]}'?)" if hint else ""
        stderr.write(f"edge-classify: {item}: {reason}{hint_text}\n")
    if not files:
        stderr.write(
            "edge-classify: error: no scans to classify. Pass image or DICOM files, folders "
            "that contain them, or globs.\n"
        )
        return ExitStatus.USAGE
    options = _options(args)
    with contextlib.ExitStack() as stack:
        classifier = stack.enter_context(Classifier.from_options(options))
        out = stack.enter_context(open(args.output, "w", newline="")) if args.output else stdout
        writer = ResultWriter(out, OutputFormat(args.format), classifier.spec.class_names)
        counts = _run(classifier, files, writer, args, stderr)
    failed = counts["failed"] + len(problems)
    if not args.quiet:
        rechecked = (
            f" ({counts['rechecked']} rechecked in FP32)" if classifier.recheck_model_path else ""
        )
        stderr.write(
            f"edge-classify: {counts['ok']} classified{rechecked}, {counts['abstained']} "
            f"abstained, {failed} failed\n"
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
    counts = {"ok": 0, "failed": 0, "abstained": 0, "rechecked": 0}
    show_progress = not args.quiet and stderr.isatty() and len(files) > 20
    stems = heatmap_stems(files) if args.heatmaps else None
    for done, result in enumerate(classifier.iter_classify(files, heatmaps=bool(args.heatmaps)), 1):
        writer.write(result)
        counts["ok" if result.ok else "failed"] += 1
        counts["abstained"] += int(result.abstained)
        counts["rechecked"] += int(result.rechecked)
        if args.heatmaps and result.ok:
            write_heatmaps([result], args.heatmaps, stems=stems)
        if show_progress:
            stderr.write(f"\r{done}/{len(files)} images")
    if show_progress:
        stderr.write("\n")
    return counts


def _watch(args: argparse.Namespace, stdout: TextIO, stderr: TextIO) -> ExitStatus:
    from edge_runtime.watch import Watcher, WatchOptions

    stop = threading.Event()
    restore = _install_stop_handlers(stop)
    try:
        watch_options = WatchOptions(
            directory=args.directory,
            output=args.output,
            state=args.state,
            interval_s=args.interval,
            settle_s=args.settle,
            once=args.once,
        )
        with (
            Classifier.from_options(_options(args)) as classifier,
            Watcher(classifier, watch_options) as watcher,
        ):
            if not args.quiet:
                stderr.write(
                    f"edge-classify: watching {args.directory} -> {args.output} "
                    f"({len(watcher.processed)} already processed"
                    + ("" if args.once else "; Ctrl-C to stop")
                    + ")\n"
                )
            summary = watcher.run(stop)
    finally:
        restore()
    if not args.quiet:
        how = "stopped by signal" if summary.stopped_by_signal else "done"
        stderr.write(
            f"edge-classify: {how}: {summary.files} files, {summary.records} records "
            f"({summary.abstained} abstained, {summary.failed} failed), "
            f"{summary.skipped} skipped as already processed\n"
        )
    if args.once and summary.failed and not summary.stopped_by_signal:
        return ExitStatus.PARTIAL
    return ExitStatus.SUCCESS


def _install_stop_handlers(stop: threading.Event):
    """SIGINT/SIGTERM set ``stop`` (the current batch finishes); returns a function to undo it."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    signals = [signal.SIGINT, signal.SIGTERM]
    previous = {sig: signal.getsignal(sig) for sig in signals}
    for sig in signals:
        signal.signal(sig, lambda _signum, _frame: stop.set())

    def restore() -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    return restore


def _bench(args: argparse.Namespace, stdout: TextIO, stderr: TextIO) -> ExitStatus:
    from edge_runtime.bench import benchmark, format_table, load_scans

    scans, label = None, None
    if args.images is not None:
        files, problems = expand_sources([str(args.images)])
        scans = load_scans(files)
        if not scans:
            reason = problems[0][1] if problems else "no readable image or DICOM files in it"
            raise ValueError(
                f"{args.images}: {reason}. Pass a folder of scans to --images, or leave it out "
                "to use synthetic ones."
            )
        label = f"{len(scans)} scans from {args.images}"
    with Classifier.from_options(_options(args)) as classifier:
        report = benchmark(
            classifier,
            batch_sizes=args.batch_sizes,
            runs=args.runs,
            warmup=args.warmup,
            scans=scans,
            scans_label=label,
            threads=args.threads,
        )
    if args.format == "json":
        stdout.write(json.dumps(report.to_dict(), indent=2) + "\n")
    else:
        stdout.write(format_table(report))
    return ExitStatus.SUCCESS


if __name__ == "__main__":
    sys.exit(main())
