"""How to install one of edge-classify's pip extras, said the same way by every message."""

from __future__ import annotations


def install_hint(extra: str) -> str:
    """The commands that install ``extra`` (e.g. ``"dicom"``): from a clone of edge-classify, as
    its README installs it, or by name where a package index serves it (PyPI does not)."""
    return f"pip install '.[{extra}]' in a clone of edge-classify, or 'edge-classify[{extra}]'"
