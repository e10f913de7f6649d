"""One writer per store: a second run into the same store says which run holds it and waits for it to end.

A local store: an OS file lock beside it (filelock, as the Hugging Face libraries lock their caches).
`features.zarr.lock` is held (flock) for the whole run, so the kernel releases it when the process dies, even
by `kill -9`. Beside it, `features.zarr.lock.owner` names the holder (pid, host, command, start time).
A store on S3: a lease object `features.zarr.lock` beside it (cache/lease_lock.py), which a dead writer's successor
takes over once it has not been renewed for its length. Any other URL cannot be locked: a warning line says so.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

from filelock import FileLock, Timeout


def lock_paths(store: str) -> tuple[Path, Path]:
    """(lock file, owner file) beside a local store (a path or a file:// URL)."""
    store = str(store)
    if store.startswith("file://"):
        store = store[len("file://"):]
    path = Path(store.rstrip("/")).absolute()
    return path.with_name(path.name + ".lock"), path.with_name(path.name + ".lock.owner")


def this_run() -> dict:
    """The owner record of this process: pid, host, command, start time (seconds since the epoch)."""
    return {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
            "command": " ".join(["pipeline"] + sys.argv[1:])[:400]}


def describe_owner(owner: dict) -> str:
    try:
        return (f"process {owner['pid']} on {owner['host']} (`{owner['command']}`, started "
                f"{time.strftime('%H:%M:%S', time.localtime(owner['started']))})")
    except (KeyError, TypeError, ValueError):
        return "another process"


def _read_owner(owner_file: Path) -> dict:
    try:
        return json.loads(owner_file.read_text())
    except (OSError, ValueError):
        return {}


def _waiting(store: str, owner: dict, log, or_when: str = "") -> None:
    log(f"waiting: {store} is being written by {describe_owner(owner)}; this run goes on when that one "
        f"ends{or_when} (Ctrl-C to stop)")


@contextmanager
def store_lock(store: str, log=print):
    """Hold the store's lock while the block runs; if another run holds it, say which one and wait for it.
    A store at a URL that cannot be locked (no conditional writes) gets a warning line and no lock."""
    from .remote_access import check_reachable
    from .storage_options import url_protocol

    protocol = url_protocol(store)
    check_reachable(store)
    if protocol is None:
        with _local_lock(store, log):
            yield
    elif protocol in ("s3", "s3a"):
        from .lease_lock import LEASE_SECONDS, ConditionalWritesUnsupported, lease_lock

        def lease_end(owner: dict) -> str:
            return f" or its lease on the lock runs out ({float(owner.get('lease_seconds', LEASE_SECONDS)):g} s unrenewed)"

        def on_wait(owner: dict) -> None:
            _waiting(store, owner, log, lease_end(owner))

        with ExitStack() as held:
            try:
                held.enter_context(lease_lock(store, this_run(), on_wait, log))
            except ConditionalWritesUnsupported:
                _cannot_lock(store, "its server refuses conditional writes (If-None-Match)", log)
            yield
    else:
        _cannot_lock(store, f"{protocol}:// offers cachetune no conditional write", log)
        yield


def _cannot_lock(store: str, why: str, log) -> None:
    log(f"warning: cannot lock {store} ({why}): a second run writing it at the same time would interleave its blocks "
        "with this run's; make sure this run is its only writer")


@contextmanager
def _local_lock(store: str, log):
    lock_file, owner_file = lock_paths(store)
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(lock_file))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        _waiting(store, _read_owner(owner_file), log)
        lock.acquire()
    try:
        owner_file.write_text(json.dumps(this_run()))
        yield
    finally:
        owner_file.unlink(missing_ok=True)
        lock.release()
