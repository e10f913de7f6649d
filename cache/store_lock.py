"""One writer per store: an OS file lock beside it (filelock, as the Hugging Face libraries lock their caches).

`features.zarr.lock` is held (flock) for the whole run, so the kernel releases it when the process dies, even
by `kill -9`. Beside it, `features.zarr.lock.owner` names the holder (pid, host, command, start time), so a
second run can say which process it waits for. Stores at object-store URLs (s3://...) are not locked.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout


def lock_paths(store: str) -> tuple[Path, Path] | None:
    """(lock file, owner file) beside a local store; None for a remote URL."""
    store = str(store)
    if "://" in store:
        if not store.startswith("file://"):
            return None
        store = store[len("file://"):]
    path = Path(store.rstrip("/")).absolute()
    return path.with_name(path.name + ".lock"), path.with_name(path.name + ".lock.owner")


def describe_owner(owner_file: Path) -> str:
    try:
        owner = json.loads(owner_file.read_text())
        return (f"process {owner['pid']} on {owner['host']} (`{owner['command']}`, started "
                f"{time.strftime('%H:%M:%S', time.localtime(owner['started']))})")
    except (OSError, ValueError, KeyError):
        return "another process"


@contextmanager
def store_lock(store: str, log=print):
    """Hold the store's lock while the block runs; if another run holds it, say which one and wait for it."""
    paths = lock_paths(store)
    if paths is None:
        yield
        return
    lock_file, owner_file = paths
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(lock_file))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log(f"waiting: {store} is being written by {describe_owner(owner_file)}; this run goes on when that one "
            "ends (Ctrl-C to stop)")
        lock.acquire()
    try:
        owner_file.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
                                          "command": " ".join(["pipeline"] + sys.argv[1:])}))
        yield
    finally:
        owner_file.unlink(missing_ok=True)
        lock.release()
