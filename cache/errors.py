"""Error types the CLI turns into one line on stderr and a documented exit code (see README, "Exit codes")."""
from __future__ import annotations

import errno
import os

EXIT_INPUT = 2  # bad input: the message names the problem and the fix
EXIT_STORAGE = 3  # an OS error (full disk, permissions, I/O) on the store or a model folder; rerun resumes
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT), as shells report it
EXIT_TERMINATED = 143  # SIGTERM (128 + 15: docker stop, Kubernetes, Slurm), as shells and schedulers report it


class CachetuneError(Exception):
    """The base of every error cachetune raises on purpose (catch this one to catch them all)."""


class InputError(CachetuneError):
    """A problem with what the user asked for; the message names the problem and the fix."""


class OtherStoreError(InputError):
    """The store at --out was made with other settings: it is someone else's, so nothing is written into it."""


class StorageError(CachetuneError):
    """An OS error while writing the store or a model folder; the message says what failed, where, and how to go on."""


def describe_os_error(error: OSError) -> str:
    """'No space left on device (errno 28) at PATH' from an OSError, without Python's repr."""
    if error.errno:
        reason = error.strerror or os.strerror(error.errno)
    else:
        reason = str(error) or type(error).__name__
    where = f" at {error.filename}" if error.filename else ""
    code = f" ({errno.errorcode.get(error.errno, error.errno)})" if error.errno else ""
    return f"{reason}{code}{where}"


def file_in_the_way(error: OSError) -> InputError | None:
    """InputError (one line, the fix) when `error` came from a plain file standing where a folder is needed:
    'File exists' from making a folder FILE over it, 'Not a directory' from a path FILE/out.jsonl through it."""
    if error.errno not in (errno.EEXIST, errno.ENOTDIR) or not error.filename:
        return None
    wanted = path = os.fspath(error.filename)
    while path and not os.path.lexists(path):
        path = os.path.dirname(path)
    if not path or not os.path.isfile(path):
        return None
    within = f" (in the path {wanted})" if path != wanted else ""
    return InputError(f"{path} is a file, not a folder{within}; give a path through folders, or move that file")


def is_disk_full(error: BaseException) -> bool:
    return isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)
