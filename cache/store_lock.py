"""Who writes or reads a store or a model folder at once: OS file locks (flock) beside it, each naming its holder.

- One writer per store: `features.zarr.lock` is held exclusively for a whole `extract` or `compact`; a second
  writer says which run holds it and waits.
- One writer per model folder: `sherl.lock` beside `artifacts/models/sherl` for a whole `fit`, `sweep` or
  `baseline`; a second run is refused (InputError) naming the first, since it would replace that run's model.
- Readers of a store (`fit`, `sweep`, `evaluate`, `info`, `compact`'s source) hold `features.zarr.read.lock`
  shared; replacing a store (`--overwrite`) takes it exclusively, so it is refused while a reader runs, naming it.

The kernel releases a lock when its process dies, even by `kill -9`. A writer's `.lock.owner` and each reader's
`.read.lock.PID@HOST` record name the holder (pid, host, command, start time).
A store on S3 has one writer too: a lease object `features.zarr.lock` beside it (cache/lease_lock.py), which a dead
writer's successor takes over once it has not been renewed for its length. Any other URL cannot be locked: a warning
line says so. Readers of remote stores take no lock.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

import psutil

from .errors import InputError, OtherStoreError


def local_path(target: str) -> Path | None:
    """The absolute path of a local store or model folder (a path or a file:// URL); None for a remote URL."""
    target = str(target)
    if "://" in target:
        if not target.startswith("file://"):
            return None
        target = target[len("file://"):]
    return Path(target.rstrip("/")).absolute()


def lock_paths(target: str) -> tuple[Path, Path] | None:
    """(lock file, owner file) beside a local store or model folder; None for a remote URL."""
    path = local_path(target)
    return None if path is None else (path.with_name(path.name + ".lock"), path.with_name(path.name + ".lock.owner"))


def read_lock_path(store: str) -> Path | None:
    """The readers' lock beside a local store; None for a remote URL."""
    path = local_path(store)
    return None if path is None else path.with_name(path.name + ".read.lock")


def describe_owner(owner_file: Path) -> str:
    try:
        return _owner_text(json.loads(owner_file.read_text()))
    except (OSError, ValueError):
        return "another process"


def _owner_record() -> str:
    return json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
                       "command": " ".join(["pipeline"] + sys.argv[1:])})


def _locked(lock_file: Path, mode: int, wait: bool) -> int | None:
    """A descriptor of lock_file holding flock `mode` (fcntl.LOCK_SH or LOCK_EX; closing it releases), or None when
    another process holds a conflicting lock and `wait` is False. Read-only, so accounts that may read a shared
    folder may lock in it too."""
    fd = os.open(lock_file, os.O_RDONLY | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, mode if wait else mode | fcntl.LOCK_NB)
        return fd
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise


@contextmanager
def _exclusive(target: str, when_held):
    """Holds the target's writer lock while the block runs; when another process holds it, `when_held(holder)` runs
    first (it raises to refuse, or returns to wait)."""
    paths = lock_paths(target)
    if paths is None:
        yield
        return
    lock_file, owner_file = paths
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    fd = _locked(lock_file, fcntl.LOCK_EX, wait=False)
    if fd is None:
        when_held(describe_owner(owner_file))
        fd = _locked(lock_file, fcntl.LOCK_EX, wait=True)
    try:
        owner_file.write_text(_owner_record())
        yield
    finally:
        owner_file.unlink(missing_ok=True)
        os.close(fd)


def _owner_text(owner: dict) -> str:
    """describe_owner for an owner record already read (a lease's)."""
    try:
        return (f"process {owner['pid']} on {owner['host']} (`{owner['command']}`, started "
                f"{time.strftime('%H:%M:%S', time.localtime(owner['started']))})")
    except (KeyError, TypeError, ValueError):
        return "another process"


@contextmanager
def store_lock(store: str, log=print):
    """Hold the store's writer lock while the block runs; if another run holds it, say which one and wait for it.
    A store at a URL that cannot be locked (no conditional writes) gets a warning line and no lock."""
    from .remote_access import check_reachable
    from .storage_options import url_protocol

    def wait(holder: str, or_when: str = ""):
        log(f"waiting: {store} is being written by {holder}; this run goes on when that one ends{or_when} "
            "(Ctrl-C to stop)")

    protocol = url_protocol(store)
    check_reachable(store)
    if protocol is None:
        with _exclusive(store, wait):
            yield
    elif protocol in ("s3", "s3a"):
        from .lease_lock import LEASE_SECONDS, ConditionalWritesUnsupported, lease_lock

        def on_wait(owner: dict) -> None:
            lease = float(owner.get("lease_seconds", LEASE_SECONDS))
            wait(_owner_text(owner), f" or its lease on the lock runs out ({lease:g} s unrenewed)")

        with ExitStack() as held:
            try:
                held.enter_context(lease_lock(store, json.loads(_owner_record()), on_wait, log))
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
def model_folder_lock(folder):
    """Hold the model folder's lock (`FOLDER.lock` beside it; it covers the folder and its checkpoint) while the
    block runs. Raises InputError naming the run that holds it."""

    def refuse(holder: str):
        raise InputError(f"{folder} is being written by {holder}; wait for that run to end, or give --out another "
                         "folder")

    with _exclusive(folder, refuse):
        yield


def writer_of(store: str) -> str | None:
    """Who holds the store's writer lock now ('process 42 on HOST (`pipeline extract ...`, started 10:02:03)'), or
    None when no run does."""
    paths = lock_paths(store)
    if paths is None:
        return None
    try:
        fd = os.open(paths[0], os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return None
    except BlockingIOError:
        return describe_owner(paths[1])
    finally:
        os.close(fd)


@contextmanager
def store_reading(store: str):
    """Hold the store's read lock (shared) while the block runs, so that no `--overwrite` replaces the store under
    this run. Raises InputError while the store is being replaced (naming the writer). No lock for a remote URL, a
    missing store (opening it says so) or a folder this account cannot create files in."""
    path, lock_file = local_path(store), read_lock_path(store)
    try:
        lockable = path is not None and path.exists()
        fd = _locked(lock_file, fcntl.LOCK_SH, wait=False) if lockable else None
    except OSError:  # a read-only folder: no run of this account replaces the store from here either
        lockable, fd = False, None
    if lockable and fd is None:
        raise InputError(f"{store} is being replaced by {describe_owner(lock_paths(store)[1])}; wait for that run "
                         "to end, then rerun")
    if not lockable:
        yield
        return
    record = lock_file.with_name(f"{lock_file.name}.{os.getpid()}@{socket.gethostname()}")
    try:
        try:
            record.write_text(_owner_record())
        except OSError:
            pass  # the lock holds without its record; a writer then names "another process"
        yield
    finally:
        record.unlink(missing_ok=True)
        os.close(fd)


def _readers(lock_file: Path) -> str:
    """'process 42 on HOST (`pipeline fit ...`, started ...)' for each live reader, from their records."""
    here, names = socket.gethostname(), []
    for record in sorted(lock_file.parent.glob(f"{lock_file.name}.*")):
        pid, _, host = record.name.removeprefix(f"{lock_file.name}.").partition("@")
        if host != here or (pid.isdigit() and psutil.pid_exists(int(pid))):  # a killed reader's record names no one
            names.append(describe_owner(record))
    return " and ".join(names) or "another process"


@contextmanager
def readers_excluded(store: str):
    """Hold the store's read lock exclusively while the block replaces the store. Raises OtherStoreError (an
    InputError: nothing is written into that store) naming the runs that read it."""
    lock_file = read_lock_path(store)
    if lock_file is None:
        yield
        return
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    fd = _locked(lock_file, fcntl.LOCK_EX, wait=False)
    if fd is None:
        raise OtherStoreError(f"{store} is being read by {_readers(lock_file)}; replacing it now would break that run: "
                         "wait for it to end, or give --out a new store")
    try:
        for stale in lock_file.parent.glob(f"{lock_file.name}.*"):  # no reader is alive while this lock is held
            stale.unlink(missing_ok=True)
        yield
    finally:
        os.close(fd)
