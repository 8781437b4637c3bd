"""Who may use the dashboard, and which host folders it may read; free of Streamlit.

Bound to a loopback address (127.0.0.0/8, ::1, localhost) the page is open, as before. Bound to
anything else it asks for a token: read from ``--token-file``, else from the environment variable
:data:`TOKEN_ENV`, else generated at start and printed once. A page without the right token shows
the token box and nothing else: no model, no upload, no folder box.

The "classify a folder on this host" box reads only under the ``--data-root`` folders (resolved,
links followed, so a link inside a root that points out of it is refused). Without a root it is
open on loopback and off beyond it.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

TOKEN_ENV = "EDGE_CLASSIFY_DASHBOARD_TOKEN"
MIN_TOKEN_CHARS = 16
_GLOB = frozenset("*?[")


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or ``localhost``) is reachable from this machine only."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class Access:
    """The dashboard's access rules for one run.

    Attributes:
        token: the token a visitor must give; None: the page is open (loopback only).
        generated: the token was generated here (print it once).
        data_roots: folders that host-folder classification may read (resolved).
        any_folder: host folders anywhere (loopback without ``--data-root``).
    """

    token: str | None
    generated: bool
    data_roots: tuple[Path, ...]
    any_folder: bool


def resolve_access(
    host: str,
    *,
    token_file: Path | None = None,
    data_roots: Sequence[Path] = (),
    environ: dict[str, str] | None = None,
) -> Access:
    """The access rules for serving on ``host``.

    Raises:
        ValueError: a token shorter than :data:`MIN_TOKEN_CHARS`, or a data root that is not a
            folder (the message names it).
        OSError: the token file cannot be read, naming it.
    """
    environ = dict(os.environ) if environ is None else environ
    token, generated = None, False
    if token_file is not None:
        try:
            token = token_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise OSError(f"{token_file}: cannot read the token ({exc.strerror or exc})") from exc
        where = str(token_file)
    else:
        token = environ.get(TOKEN_ENV, "").strip() or None
        where = f"${TOKEN_ENV}"
    if token is not None and len(token) < MIN_TOKEN_CHARS:
        raise ValueError(
            f"{where}: the dashboard token must have at least {MIN_TOKEN_CHARS} characters. Got "
            f"{len(token)} instead. Leave it out to have one generated."
        )
    if token is None and not is_loopback(host):
        token, generated = secrets.token_urlsafe(24), True
    roots = []
    for root in data_roots:
        resolved = Path(root).expanduser().resolve()
        if not resolved.is_dir():
            raise ValueError(f"{root}: --data-root must be an existing folder.")
        roots.append(resolved)
    return Access(token, generated, tuple(roots), any_folder=not roots and is_loopback(host))


def token_matches(expected: str | None, given: str | None) -> bool:
    """Constant-time comparison; an open page (``expected`` None) matches anything."""
    if expected is None:
        return True
    return given is not None and hmac.compare_digest(expected.encode(), given.strip().encode())


def folder_allowed(
    folder: str, data_roots: Sequence[Path], *, any_folder: bool
) -> tuple[Path | None, str | None]:
    """Whether the page may read ``folder``: ``(resolved folder, None)`` or ``(None, reason)``."""
    if not any_folder and not data_roots:
        return None, (
            "classifying folders on this host is off: the dashboard is served beyond this "
            "machine without --data-root. Upload scans instead, or restart it with --data-root DIR."
        )
    if any_folder:
        return Path(folder).expanduser(), None
    if _GLOB & set(folder):
        return None, f"{folder}: give a folder under a data root, without wildcards."
    resolved = Path(folder).expanduser().resolve()
    if not any(resolved == root or root in resolved.parents for root in data_roots):
        roots = ", ".join(map(str, data_roots))
        return None, f"{folder}: not under a data root of this dashboard ({roots})."
    return resolved, None


def within_roots(path: Path, data_roots: Sequence[Path]) -> bool:
    """Whether a file found under a root really lies there (links resolved)."""
    real = Path(path).resolve()
    return any(root in real.parents for root in data_roots)
