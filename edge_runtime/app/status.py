"""Exit statuses of the three commands: ``edge-classify``, ``edge-train`` and ``edge-export``."""

from __future__ import annotations

from enum import IntEnum

__all__ = ["ExitStatus"]


class ExitStatus(IntEnum):
    """What a command's exit status means; every ``main(argv)`` returns one.

    ``GATE_FAILED`` is the same status as ``PARTIAL`` (1): ``edge-export`` uses it when a parity
    gate refused the model.
    """

    SUCCESS = 0  # everything asked for was done
    PARTIAL = 1  # edge-classify: some inputs failed (each with its own error record), or
    # some scans' --heatmaps/--masks files could not be written (each named on stderr)
    GATE_FAILED = 1  # edge-export: a parity gate refused the model; a report, no model
    USAGE = 2  # bad arguments, missing data or an unusable model: nothing was done
    INTERNAL_ERROR = 70  # a bug (sysexits' EX_SOFTWARE): the message says to rerun with --traceback
    INTERRUPTED = 130  # Ctrl-C (128 + SIGINT), as shells report it
