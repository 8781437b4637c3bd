"""The delimiter of a CSV file that people save: edge-train's manifests and adapt's site lists.

A comma, unless the header line has none: then a semicolon (what Excel saves as "CSV" where a
comma is the decimal separator) or a tab, whichever the line holds first in that order.
"""

from __future__ import annotations

DELIMITERS = (",", ";", "\t")


def csv_delimiter(header: str) -> str:
    """The delimiter of a CSV file whose first line is ``header`` (module docstring).

    Example:
        >>> csv_delimiter("path;label;patient")
        ';'
    """
    return next((d for d in DELIMITERS if d in header), ",")
