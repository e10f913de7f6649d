"""Model folders appear whole or not at all: written under a temporary name beside the target, then renamed.

A kill while the files are written leaves only the hidden `.NAME.partial` folder, which never loads as a
model, `pipeline report` skips, and the next write removes. An existing folder is replaced by two renames
(it moves to `.NAME.old` first); a kill between them leaves no folder at NAME, never a half-written one.
"""
from __future__ import annotations

import shutil
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_folder(final: Path):
    """Yields an empty temporary folder; when the block ends without error it becomes `final`."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    partial, old = final.with_name(f".{final.name}.partial"), final.with_name(f".{final.name}.old")
    for stale in (partial, old):
        shutil.rmtree(stale, ignore_errors=True)
    partial.mkdir()
    try:
        yield partial
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if final.exists():
        final.rename(old)
    partial.rename(final)
    shutil.rmtree(old, ignore_errors=True)
