"""``edge-classify dashboard``: a Streamlit page to classify scans by hand (``dashboard`` extra).

Importing this package does not import Streamlit; :mod:`edge_runtime.app.dashboard.app` is the
Streamlit script and :mod:`edge_runtime.app.dashboard.scans` its logic.
"""

from edge_runtime.app.dashboard.launch import (
    APP_PATH,
    DASHBOARD_EXTRA_HINT,
    run_dashboard,
    streamlit_available,
    streamlit_command,
)

__all__ = [
    "APP_PATH",
    "DASHBOARD_EXTRA_HINT",
    "run_dashboard",
    "streamlit_available",
    "streamlit_command",
]
