"""The one place that turns an error raised inside model, tokenizer or layer code into cachetune's own InputError."""
from __future__ import annotations

import os
from contextlib import contextmanager

import click

from cachetune.cache.errors import InputError, StorageError


@contextmanager
def library_errors(step: str, backbone: str):
    """An error the model, tokenizer or layer code raises during `step` becomes one InputError line (exit 2)
    naming the step and the backbone: rerunning the same command would fail the same way, so the line says to
    change the backbone or the options instead. CACHETUNE_TRACEBACK=1 lets the traceback through (for a report)."""
    try:
        yield
    except (InputError, StorageError, OSError, KeyboardInterrupt, click.exceptions.ClickException, SystemExit):
        raise
    except Exception as error:
        if os.environ.get("CACHETUNE_TRACEBACK"):
            raise
        text = str(error).strip()
        reason = f"{type(error).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")
        raise InputError(f"{step} failed inside the model code on the backbone {backbone} ({reason}); the same command "
                         "will fail again: change the backbone or the options (CACHETUNE_TRACEBACK=1 shows where)") from None
