"""What several `pipeline` commands share: default paths, the notes channel, --delimiter, --device and --precision."""
from __future__ import annotations

import os

import click

DEFAULT_CACHE = os.path.join("artifacts", "features.zarr")
DEFAULT_MODELS = os.path.join("artifacts", "models")


def log(line: str) -> None:
    click.echo(line, err=True)


def delimiter_option(text):
    from cachetune.pipeline.tables import parse_delimiter

    return parse_delimiter(text)


def runtime_options(command):
    """--device and --precision, shared by fit, evaluate, predict and baseline (stages/runtime.py decides)."""
    options = [
        click.option("--device", default="auto", show_default=True,
                     help="auto (a GPU when there is one), cpu, cuda or cuda:N."),
        click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default="auto", show_default=True,
                     help="Autocast precision; auto: bf16 on a GPU that supports it, else fp32."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def resolve_runtime(device, precision):
    from cachetune.stages.runtime import Runtime

    return Runtime.resolve(device, precision)
