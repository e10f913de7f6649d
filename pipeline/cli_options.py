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


def storage_option(*store_params):
    """--storage-option KEY=VALUE (repeatable), applied to the stores named by the command's `store_params` (a
    store at a URL; cache/storage_options.py). A command without `store_params` gets the parsed options as
    `storage_options` and applies them itself."""
    from functools import wraps

    def parse(ctx, param, pairs):
        from cachetune.cache.errors import InputError
        from cachetune.cache.storage_options import parse_storage_options

        try:
            return parse_storage_options(pairs)
        except InputError as error:
            raise click.BadParameter(str(error)) from None

    def decorate(command):
        option = click.option("--storage-option", "storage_options", multiple=True, metavar="KEY=VALUE", callback=parse,
                              help="An option of the filesystem behind a store URL, for fsspec (s3: endpoint_url=http://"
                                   "HOST:9000, profile=NAME, ...); repeatable; never written anywhere.")
        if not store_params:
            return option(command)

        @wraps(command)
        def run(*args, storage_options, **kwargs):
            from cachetune.cache.storage_options import storage_options as use_options

            with use_options([kwargs[name] for name in store_params], storage_options):
                return command(*args, **kwargs)

        return option(run)

    return decorate
