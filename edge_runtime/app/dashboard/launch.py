"""Starting the dashboard: Streamlit headless, on localhost, with no usage statistics."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from edge_runtime.app.dashboard.access import TOKEN_ENV, Access, resolve_access
from edge_runtime.extras import install_hint

APP_PATH = Path(__file__).with_name("app.py")
DASHBOARD_EXTRA_HINT = (
    f"the dashboard needs the dashboard extra (Streamlit): {install_hint('dashboard')}"
)
INTERRUPTED = 130  # the shell's status for a command stopped by Ctrl-C


def streamlit_available() -> bool:
    """Whether Streamlit is installed (without importing it)."""
    return importlib.util.find_spec("streamlit") is not None


def streamlit_command(
    *,
    host: str,
    port: int,
    model: str | None,
    data_roots: Sequence[Path] = (),
    any_folder: bool = False,
) -> list[str]:
    """The ``streamlit run`` command line of the dashboard.

    Headless (no browser opened), usage statistics off, no file watcher and no welcome message
    (whose "External URL" asks a web service for this host's address), served at ``host:port``.
    ``model`` is handed to the script as ``--model``, each data root as ``--data-root``, and
    ``any_folder`` (host folders anywhere: loopback without a root) as ``--any-folder``.
    """
    command = [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        str(APP_PATH),
        "--server.headless=true",
        "--browser.gatherUsageStats=false",
        f"--server.address={host}",
        f"--server.port={port}",
        "--server.fileWatcherType=none",
        "--server.runOnSave=false",
        "--logger.hideWelcomeMessage=true",
        "--client.toolbarMode=viewer",
        "--",
    ]
    if model is not None:
        command += ["--model", str(model)]
    for root in data_roots:
        command += ["--data-root", str(root)]
    if any_folder:
        command.append("--any-folder")
    return command


def run_dashboard(
    *,
    host: str,
    port: int,
    model: str | None,
    stderr: TextIO,
    access: Access | None = None,
) -> int:
    """Serve the dashboard until Streamlit stops, Ctrl-C or SIGTERM; returns the exit status.

    Streamlit runs as a child process; Ctrl-C and SIGTERM are passed on to it, so it never
    outlives this command. ``access`` (default: :func:`resolve_access` for ``host``) says
    whether the page asks for a token, handed to the child in its environment (never on its
    command line), and which host folders it may read; a generated token is printed once here.

    Returns:
        130 after Ctrl-C, otherwise Streamlit's own status (0 when it stopped cleanly).
    """
    access = resolve_access(host) if access is None else access
    stderr.write(f"edge-classify: dashboard at http://{host}:{port} (Ctrl-C stops it)\n")
    if access.generated:
        stderr.write(f"edge-classify: access token (shown once): {access.token}\n")
    elif access.token is not None:
        stderr.write("edge-classify: the page asks for the access token you gave\n")
    stderr.flush()
    env = {k: v for k, v in os.environ.items() if k != TOKEN_ENV}
    if access.token is not None:
        env[TOKEN_ENV] = access.token
    command = streamlit_command(
        host=host,
        port=port,
        model=model,
        data_roots=access.data_roots,
        any_folder=access.any_folder,
    )
    process = subprocess.Popen(command, env=env)
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, lambda *_: process.terminate()) if in_main else None
    try:
        return process.wait()
    except KeyboardInterrupt:
        process.send_signal(signal.SIGINT)  # Streamlit stops as it does on its own Ctrl-C
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        return INTERRUPTED
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
