"""What a job's console shows: its own progress lines, summary, warnings and errors, not the INFO chatter
of the libraries under it. Ray Data and Ray Train keep writing everything to their log files in Ray's
session folder (``logs/ray-data``, ``logs/train``); only their console output is raised to warnings."""

from __future__ import annotations

import logging
import os
import sys

LIBRARY_LEVEL = logging.WARNING


class _RayInfoOffConsole(logging.Filter):
    """Drops records below warnings that Ray's own modules log to the root logger (Ray Train's worker
    logs every report's repr there, under a logger named by file path rather than ``ray.train``)."""

    def __init__(self, package: str) -> None:
        super().__init__()
        self.package = package

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= LIBRARY_LEVEL or not record.pathname.startswith(self.package)


def _consoles(logger: logging.Logger) -> list[logging.Handler]:
    return [handler for handler in logger.handlers
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler)]


def quiet_libraries() -> None:
    """In this process (a driver, a Train worker, a Tune trial): Ray's and MLflow's console output at
    warnings, no progress bars where nobody watches a terminal, no artifact download bars."""
    import ray
    import ray.data

    for handler in _consoles(logging.getLogger("ray.data")):
        handler.setLevel(LIBRARY_LEVEL)  # the session's ray-data.log keeps the INFO lines
    package = os.path.dirname(ray.__file__)
    for handler in _consoles(logging.getLogger()):
        if not any(isinstance(existing, _RayInfoOffConsole) for existing in handler.filters):
            handler.addFilter(_RayInfoOffConsole(package))
    logging.getLogger("mlflow").setLevel(LIBRARY_LEVEL)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    ray.data.DataContext.get_current().enable_progress_bars = sys.stderr.isatty()
