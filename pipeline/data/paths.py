"""Where relative local paths point: the directory a job was launched from, also under ``ray job submit``.

A command run in a shell resolves ``outputs/...`` against the current directory. A job sent with
``ray job submit --working-dir .`` runs in Ray's temporary copy of that directory: relative paths
would land there (and vanish with it), so they are refused there unless the submitter names its
directory with ``--base-dir "$PWD"`` (or the runtime environment sets :data:`BASE_DIR_VARIABLE`).
Everything is resolved once, on the driver; Ray workers receive absolute paths only.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

BASE_DIR_VARIABLE = "SSAMBA_BASE_DIR"
# Ray's job supervisor sets this in the environment of every submitted job's entrypoint.
SUBMITTED_JOB_VARIABLE = "RAY_JOB_CONFIG_JSON_ENV_VAR"


class RelativePathError(ValueError):
    """A relative local path in a submitted job without a base directory."""


def submitted_job() -> bool:
    """Whether this process is the entrypoint of a ``ray job submit``."""
    return SUBMITTED_JOB_VARIABLE in os.environ


@contextlib.contextmanager
def base_directory(directory: str | Path | None) -> Iterator[None]:
    """Resolve relative paths against ``directory`` inside the block (``--base-dir``; ``None``: as before)."""
    previous = os.environ.get(BASE_DIR_VARIABLE)
    if directory is not None:
        os.environ[BASE_DIR_VARIABLE] = str(Path(directory).expanduser().resolve())
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(BASE_DIR_VARIABLE, None)
        else:
            os.environ[BASE_DIR_VARIABLE] = previous


def absolute(path: str | Path) -> Path:
    """``path`` made absolute against the base directory: ``--base-dir``, else the current directory
    (refused in a submitted job, where that is Ray's temporary copy of the working directory)."""
    path = Path(path).expanduser()
    if path.is_absolute():
        return path.resolve()
    base = os.environ.get(BASE_DIR_VARIABLE)
    if base is None and submitted_job():
        raise RelativePathError(
            f"{path.as_posix()!r} is a relative path, and this job runs under `ray job submit` in a temporary copy "
            "of the working directory: add --base-dir \"$PWD\" to the command (relative paths then resolve "
            "against the directory you submitted from), or give an absolute path or a storage URI (s3://...)")
    return (Path(base or os.getcwd()) / path).resolve()


def without_userinfo(value: str) -> str:
    """A URI without the ``user:password@`` part (``http://u:p@host/x`` → ``http://host/x``); other text as is."""
    if "://" not in value:
        return value
    parts = urlsplit(value)
    if "@" not in parts.netloc:
        return value
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))
