"""The `pipeline report` command; pipeline/cli.py registers it with `main.add_command(report)`.

Kept apart from cli.py (and not importing it) so either module can be imported first.
"""
from __future__ import annotations

import os
import sys

import click

from cachetune.cache.errors import InputError

DEFAULT_MODELS = os.path.join("artifacts", "models")
DEFAULT_REPORTS = "reports"


@click.command()
@click.option("--models", "models_dir", default=DEFAULT_MODELS, show_default=True,
              help="Folder of model folders (each with a metrics.json), searched at any depth.")
@click.option("--out", "out_dir", default=DEFAULT_REPORTS, show_default=True,
              help="Where report.md, the PNG plots and history/*.csv go.")
def report(models_dir, out_dir):
    """Compare every fitted model: a Markdown table, test metric against peak memory, and training curves."""
    from pathlib import Path

    from cachetune.pipeline.report import write_report

    try:
        path = write_report(Path(models_dir), Path(out_dir))
    except InputError as error:  # as pipeline.cli.user_errors: one line on stderr, exit 2
        click.echo(f"error: {error}", err=True)
        sys.exit(2)
    click.echo(f"wrote {path} with plots and per-epoch histories in {path.parent}")
