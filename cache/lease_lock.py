"""One writer per store on S3: a lease object beside the store, taken and renewed by conditional writes.

`s3://bucket/features.zarr.lock` is created only if absent (`If-None-Match: *`) and names its holder in its
metadata (pid, host, command, start time, lease length). A thread renews it every third of the lease by rewriting it
only if it is still the holder's version (`If-Match: ETag`). A lease not renewed for its length, judged by the
server's own clock (its Date header against the object's Last-Modified), belongs to a writer that died: the next run
takes it over, again with `If-Match`, so two waiting runs cannot both win. The lease is deleted when the run ends.
A run stalled past its lease (a suspended process, a network partition) finds at its next renewal that another run
took the lease over: it says so in one line and stops as Ctrl-C would (blocks already flagged done stay; a rerun
after the other run ends resumes), rather than write beside the new holder.
"""
from __future__ import annotations

import _thread
import json
import os
import threading
import time
from contextlib import contextmanager
from email.utils import parsedate_to_datetime

LEASE_SECONDS = 60.0  # CACHETUNE_LOCK_LEASE_SECONDS overrides it (tests use a short one)


class ConditionalWritesUnsupported(Exception):
    """The storage answered a conditional write with NotImplemented: it cannot hold a lease."""


def lease_seconds() -> float:
    return float(os.environ.get("CACHETUNE_LOCK_LEASE_SECONDS", LEASE_SECONDS))


def _error_code(error: BaseException) -> str | None:
    """The S3 error code behind s3fs's translated exception ('PreconditionFailed', 'NotImplemented', ...)."""
    response = getattr(error.__cause__, "response", None) or {}
    return response.get("Error", {}).get("Code")


class Lease:
    """The lease object `key` in `bucket`, through an s3fs filesystem."""

    def __init__(self, fs, bucket: str, key: str, owner: dict):
        self.fs, self.bucket, self.key, self.etag = fs, bucket, key, None
        self.owner = {**owner, "lease_seconds": lease_seconds()}

    def _put(self, **condition) -> bool:
        """Write our lease under `condition`; False when the condition failed (someone else's lease is there)."""
        text = json.dumps(self.owner, ensure_ascii=True)
        try:
            reply = self.fs.call_s3("put_object", Bucket=self.bucket, Key=self.key, Body=text.encode(),
                                    Metadata={"owner": text}, **condition)
        except OSError as error:
            code = _error_code(error)
            if code in ("PreconditionFailed", "ConditionalRequestConflict"):
                return False
            if code in ("NotImplemented", "501"):
                raise ConditionalWritesUnsupported(str(error)) from None
            raise
        self.etag = reply["ETag"]
        return True

    def holder(self) -> tuple[dict, str, bool] | None:
        """(holder's owner record, ETag, expired) of the lease there now, or None when there is none."""
        try:
            head = self.fs.call_s3("head_object", Bucket=self.bucket, Key=self.key)
        except FileNotFoundError:
            return None
        try:
            owner = json.loads(head.get("Metadata", {}).get("owner", "{}"))
        except ValueError:
            owner = {}
        now = parsedate_to_datetime(head["ResponseMetadata"]["HTTPHeaders"]["date"])
        age = (now - head["LastModified"]).total_seconds()
        return owner, head["ETag"], age > float(owner.get("lease_seconds", LEASE_SECONDS))

    def try_acquire(self) -> dict | None:
        """Take the lease if it is free or expired; otherwise the holder's owner record."""
        if self._put(IfNoneMatch="*"):
            return None
        current = self.holder()
        if current is None:  # released between our write and our look
            return self.try_acquire()
        owner, etag, expired = current
        if expired and self._put(IfMatch=etag):
            return None
        return owner

    def renew(self) -> bool:
        return self._put(IfMatch=self.etag)

    def release(self) -> None:
        try:
            self.fs.call_s3("delete_object", Bucket=self.bucket, Key=self.key, IfMatch=self.etag)
        except OSError:  # taken over or gone (not ours to delete), or unreachable (the lease then expires)
            pass


@contextmanager
def lease_lock(store: str, owner: dict, on_wait, log=print):
    """Hold the lease of the S3 store `store` while the block runs. When another run holds it, `on_wait(holder's
    owner record)` is called once and this one waits for it to end or its lease to expire. Raises
    ConditionalWritesUnsupported when the storage has no conditional writes (nothing is written then)."""
    from .writer import store_fs

    fs, path = store_fs(store)
    bucket, key, _ = fs.split_path(path.rstrip("/") + ".lock")
    lease = Lease(fs, bucket, key, owner)
    holder = lease.try_acquire()
    if holder is not None:
        on_wait(holder)
        while holder is not None:
            time.sleep(min(5.0, lease_seconds() / 4))
            holder = lease.try_acquire()
    stop, lost = threading.Event(), []

    def keep_renewing():
        while not stop.wait(lease.owner["lease_seconds"] / 3):
            try:
                if not lease.renew():
                    lost.append(True)
                    log(f"error: the lock on {store} was taken over by another run while this one was stalled; "
                        "this run stops (rerun it after the other ends)")
                    _thread.interrupt_main()  # KeyboardInterrupt in the main thread: Ctrl-C's clean-up and exit
                    return
            except Exception as error:  # a failed renewal is retried; the lease lasts three renewals
                log(f"warning: renewing the lock on {store} failed ({error}); retrying")

    renewer = threading.Thread(target=keep_renewing, daemon=True)
    renewer.start()
    try:
        yield
    finally:
        stop.set()
        renewer.join()
        if not lost:
            lease.release()
