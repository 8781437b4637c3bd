"""Starting the dashboard: Streamlit headless, on localhost, with no usage statistics."""

from __future__ import annotations

import importlib.util
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import TextIO

APP_PATH = Path(__file__).with_name("app.py")
DASHBOARD_EXTRA_HINT = (
    "the dashboard needs the dashboard extra (Streamlit): pip install 'edge-classify[dashboard]'"
)
INTERRUPTED = 130  # the shell's status for a command stopped by Ctrl-C


def streamlit_available() -> bool:
    """Whether Streamlit is installed (without importing it)."""
    return importlib.util.find_spec("streamlit") is not None


def streamlit_command(*, host: str, port: int, model: str | None) -> list[str]:
    """The ``streamlit run`` command line of the dashboard.

    Headless (no browser opened), usage statistics off, no file watcher and no welcome message
    (whose "External URL" asks a web service for this host's address), served at ``host:port``.
    ``model`` is handed to the script as ``--model``.
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
    return command


def run_dashboard(*, host: str, port: int, model: str | None, stderr: TextIO) -> int:
    """Serve the dashboard until Streamlit stops, Ctrl-C or SIGTERM; returns the exit status.

    Streamlit runs as a child process; Ctrl-C and SIGTERM are passed on to it, so it never
    outlives this command.

    Returns:
        130 after Ctrl-C, otherwise Streamlit's own status (0 when it stopped cleanly).
    """
    stderr.write(f"edge-classify: dashboard at http://{host}:{port} (Ctrl-C stops it)\n")
    stderr.flush()
    process = subprocess.Popen(streamlit_command(host=host, port=port, model=model))
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
