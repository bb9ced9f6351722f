"""One launch of a named run at a time: a lock object in the run's storage folder.

Two launches of one run name would otherwise both train into one checkpoint folder and open two
MLflow runs of the same name. The lock is a small JSON object (``<storage_path>/<name>/_launch.json``)
that works the same on a local disk and in an object store: the launch writes it with a random token,
reads it back after a pause (the last writer of a race wins, the other stops), and rewrites it every
:data:`HEARTBEAT_S` seconds while it runs. A lock whose heartbeat is older than :data:`STALE_AFTER_S`
belongs to a launch that died (SIGKILL, a lost machine): the next launch takes it over and says so.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator

from pipeline.data.storage import Location

LOCK_FILE = "_launch.json"
HEARTBEAT_S = 20.0
STALE_AFTER_S = 120.0
SETTLE_S = 1.0  # pause between writing the lock and reading it back


class RunLocked(RuntimeError):
    """Another launch of the same run name is running."""


def _describe(lock: dict) -> str:
    started = dt.datetime.fromtimestamp(lock["started"], dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    return f"launched on {lock['host']} (pid {lock['pid']}) at {started}, last seen {time.time() - lock['heartbeat']:.0f} s ago"


def _read(location: Location) -> dict | None:
    try:
        return json.loads(location.read_bytes()) if location.exists() else None
    except (OSError, ValueError):  # half-written or vanished between the two calls: no valid lock
        return None


class _Heartbeat(threading.Thread):
    """Rewrites the lock while the launch runs, as long as it is still this launch's."""

    def __init__(self, location: Location, lock: dict, every_s: float) -> None:
        super().__init__(name="run-lock-heartbeat", daemon=True)
        self.location, self.lock, self.every_s = location, lock, every_s
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.every_s):
            current = _read(self.location)
            if current is None or current.get("token") != self.lock["token"]:
                return
            self.lock["heartbeat"] = time.time()
            with contextlib.suppress(OSError):  # a missed beat is retried; only a long outage makes it stale
                self.location.write_bytes(json.dumps(self.lock).encode())


@contextlib.contextmanager
def hold(run_folder: Location, name: str, stale_after_s: float = STALE_AFTER_S,
         heartbeat_s: float = HEARTBEAT_S) -> Iterator[dict | None]:
    """Hold the run's lock for the block; yields the stale lock of a launch that died, if any. Raises
    :class:`RunLocked` naming the running launch when another one holds it."""
    location = run_folder.join(LOCK_FILE)
    previous = _read(location)
    if previous is not None and time.time() - previous["heartbeat"] < stale_after_s:
        raise RunLocked(f"run {name} is already running: {_describe(previous)} ({location.uri}). Wait for it to "
                        f"end or stop it; a launch that died frees the run {stale_after_s:.0f} s after its last beat.")
    now = time.time()
    lock = {"token": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid(), "started": now,
            "heartbeat": now}
    location.write_bytes(json.dumps(lock).encode())
    time.sleep(SETTLE_S)
    winner = _read(location)
    if winner is None or winner["token"] != lock["token"]:
        raise RunLocked(f"run {name} was launched twice at once; the other launch runs it"
                        + (f": {_describe(winner)}" if winner else ""))
    if previous is not None:
        print(f"run {name}: its last launch stopped without ending ({_describe(previous)}); taking the run over",
              flush=True)
    heartbeat = _Heartbeat(location, lock, heartbeat_s)
    heartbeat.start()
    try:
        yield previous
    finally:
        heartbeat.stopped.set()
        heartbeat.join()
        if (_read(location) or {}).get("token") == lock["token"]:
            with contextlib.suppress(OSError):
                location.delete()
