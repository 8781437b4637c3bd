"""The command-line shell all three commands share (``edge-classify``, ``edge-train``,
``edge-export``): one parser class, the options every command has, and one mapping from what a
command's body raises to an :class:`~edge_runtime.app.status.ExitStatus` (httpie's ``main`` shape).

Every command has ``--version``, ``--quiet`` and ``--traceback``; a mistyped option gets a "did you
mean" hint, never a silent correction; cross-flag rules run at parse time (``check``), before a
model or TensorFlow loads. Nothing here imports TensorFlow or an extra.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import sys
import traceback as tb
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TextIO

from edge_runtime.app.status import ExitStatus
from edge_runtime.extras import install_hint

__all__ = [
    "USAGE_ERRORS",
    "Parser",
    "command_parser",
    "missing_extra",
    "package_version",
    "parse_args",
    "run_command",
]

# what a user can fix: a message, not a stack (ContractError is a ValueError)
USAGE_ERRORS: tuple[type[BaseException], ...] = (OSError, ValueError, ImportError)


def package_version() -> str:
    """The installed edge-classify's version ("unknown" from a source tree never installed)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("edge-classify")
    except PackageNotFoundError:
        return "unknown"


class _VersionAction(argparse.Action):
    """``--version``: print ``PROG (edge-classify VERSION)`` and exit. The version is looked up
    only then: reading the installed packages' metadata costs ~25 ms of every cold start."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS) -> None:
        super().__init__(
            option_strings,
            dest,
            default=argparse.SUPPRESS,
            nargs=0,
            help="show the version and exit",
        )

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        parser._print_message(f"{parser.prog} (edge-classify {package_version()})\n", sys.stdout)
        parser.exit()


class Parser(argparse.ArgumentParser):
    """argparse with "did you mean" for mistyped options (never silently corrected)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        import difflib  # only on errors: a shorter cold start

        options = [s for a in self._actions for s in a.option_strings]
        for word in message.split():
            name = word.split("=")[0].strip("',:.()")
            if name.startswith("--") and name not in options:  # a known option needs no hint
                close = difflib.get_close_matches(name, options, n=1)
                if close:
                    message += f" (did you mean {close[0]}?)"
                    break
        super().error(message)


def command_parser(prog: str, description: str, epilog: str, *, extra: str | None = None) -> Parser:
    """A parser with the options every command has (``--version``, ``--quiet``,
    ``--traceback``), whose epilog (the numbered examples) keeps its line breaks; ``extra`` names
    the pip extra the command needs, in its description."""
    if extra:
        description += f" Needs the {extra} extra: {install_hint(extra)}."
    parser = Parser(
        prog=prog,
        description=description,
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action=_VersionAction)
    parser.add_argument("--quiet", action="store_true", help="only warnings and errors on stderr")
    parser.add_argument(
        "--traceback",
        action="store_true",
        help="show the full Python traceback on an error (for bug reports)",
    )
    return parser


def missing_extra(
    command: str, extra: str, modules: Sequence[str], stderr: TextIO
) -> ExitStatus | None:
    """Say which extra to install when any of ``modules`` is not installed (checked without
    importing them): writes the message to ``stderr`` and returns ``ExitStatus.USAGE``; None when
    all are there."""
    missing = [name for name in modules if importlib.util.find_spec(name) is None]
    if not missing:
        return None
    stderr.write(
        f"{command}: error: {command} needs the {extra} extra (not installed: "
        f"{', '.join(missing)}): {install_hint(extra)}\n"
    )
    return ExitStatus.USAGE


def parse_args(
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | None,
    stdout: TextIO,
    stderr: TextIO,
    check: Callable[[argparse.Namespace], None] | None = None,
) -> argparse.Namespace | ExitStatus:
    """The parsed arguments, or the status to exit with (``--help``, ``--version``: SUCCESS; a
    usage error, also one ``check`` raises with ``parser.error``: USAGE), with argparse's text
    on the given streams."""
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            args = parser.parse_args(argv)
            if check is not None:
                check(args)
    except SystemExit as exit_:
        return ExitStatus.SUCCESS if exit_.code == 0 else ExitStatus.USAGE
    return args


def check_output_folder(parser: argparse.ArgumentParser, output: Path) -> None:
    """Refuse (``parser.error``, exit 2) an ``--output`` folder that could never be written to:
    it exists and is not a folder, a part of it is not a folder, or the folder it would be made
    in is not writable by this user. Called before anything loads, so no long run starts."""
    if output.exists() and not output.is_dir():
        parser.error(f"--output {output}: exists and is not a folder")
    existing = next(p for p in (output, *output.absolute().parents) if p.exists())
    if not existing.is_dir():
        parser.error(f"--output {output}: cannot be created: {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        parser.error(f"--output {output}: the folder {existing} is not writable")


def whole_number(minimum: int) -> Callable[[str], int]:
    """An argparse ``type``: a whole number >= ``minimum``; its error names the range."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(
                f"must be a whole number >= {minimum}. Got {text!r} instead."
            )
        return value

    return parse


def share(*, above_zero: bool = False, below_one: bool = False) -> Callable[[str], float]:
    """An argparse ``type``: a number in [0, 1], (0, 1] with ``above_zero``, [0, 1) with
    ``below_one`` (NaN in none); its error names the interval."""
    interval = f"{'(' if above_zero else '['}0, 1{')' if below_one else ']'}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number. Got {text!r} instead.") from None
        low_ok = value > 0.0 if above_zero else value >= 0.0
        high_ok = value < 1.0 if below_one else value <= 1.0
        if not (low_ok and high_ok):
            raise argparse.ArgumentTypeError(f"must be in {interval}. Got {text!r} instead.")
        return value

    return parse


def run_command(
    prog: str,
    body: Callable[[], int],
    *,
    stderr: TextIO,
    stdout: TextIO | None = None,
    traceback: bool = False,
    usage_errors: tuple[type[BaseException], ...] = USAGE_ERRORS,
) -> int:
    """Run a command's body and turn what it raises into an :class:`ExitStatus`.

    A closed stdout (``| head``) ends quietly (PARTIAL); Ctrl-C says so and gives INTERRUPTED;
    ``usage_errors`` print ``<prog>: error: <message>`` and give USAGE; anything else is a bug:
    INTERNAL_ERROR, with where it happened and the ``--traceback`` hint. With ``traceback``,
    errors are re-raised with their stack.
    """
    try:
        return body()
    except BrokenPipeError:
        if stdout is sys.__stdout__:  # keep Python's exit flush quiet too
            with contextlib.suppress(OSError, ValueError):
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.__stdout__.fileno())
        return ExitStatus.PARTIAL
    except KeyboardInterrupt:
        stderr.write(f"{prog}: interrupted\n")
        return ExitStatus.INTERRUPTED
    except usage_errors as exc:
        if traceback:
            raise
        stderr.write(f"{prog}: error: {exc}\n")
        return ExitStatus.USAGE
    except Exception as exc:
        if traceback:
            raise
        where = tb.extract_tb(exc.__traceback__)[-1]
        stderr.write(
            f"{prog}: internal error: {type(exc).__name__}: {exc}\n"
            f"  at {where.filename}:{where.lineno}; rerun with --traceback to see the stack, and "
            "report it with that output\n"
        )
        return ExitStatus.INTERNAL_ERROR
