"""Progress bars that stay readable in logs: frequent redraws on a terminal, sparse lines elsewhere."""
from __future__ import annotations

import sys

from tqdm.auto import tqdm


def progress_bar(**kwargs) -> tqdm:
    interactive = sys.stderr.isatty()
    return tqdm(mininterval=0.2 if interactive else 15.0, dynamic_ncols=interactive, **kwargs)
