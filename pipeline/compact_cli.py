"""The `pipeline compact` command; pipeline/cli.py registers it with `main.add_command(compact)`.

Kept apart from cli.py (and not importing it) so either module can be imported first; faults end as cli.py's do:
one line on stderr, exit 2 (bad input), 3 (an OS error on the store), 130 (Ctrl-C) or 143 (SIGTERM).
"""
from __future__ import annotations

import sys

import click

from cachetune.cache.errors import EXIT_INPUT, EXIT_STORAGE, InputError, describe_os_error

from .cli_errors import interrupted

from .cli_options import storage_option


@click.command()
@click.argument("source")
@click.option("--dtype", type=click.Choice(["fp8", "int8", "float16", "float32"]), default="fp8", show_default=True,
              help="Codes per value: fp8 (e4m3, extract's default) or int8 with a float16 scale per token and 64 "
                   "channels (int8 loses ordinary values beside a decoder's massive activations: BENCHMARKS.md); "
                   "float16/float32 only with --reduce.")
@click.option("--reduce", default=None, metavar="pca:K",
              help="Store K PCA coefficients per token and layer, K below the hidden size (basis fitted on a seeded sample "
                   "of training tokens; pca:96 on a 384-wide model keeps a quarter).")
@click.option("--codec", type=click.Choice(["lz4", "zstd", "none"]), default="lz4", show_default=True,
              help="Lossless compressor (blosc) of the re-encoded blocks; every chunk also gets a crc32c checksum.")
@click.option("--out", required=True, help="The new store (never SOURCE itself).")
@click.option("--overwrite", is_flag=True, help="Replace a store at --out made from another source or with other settings.")
@click.option("--lossy", default=None, hidden=True, help="Removed: use --dtype int8 or fp8 (an error says so).")
@storage_option()
def compact(source, dtype, reduce, codec, out, overwrite, lossy, storage_options):
    """Re-encode the float16/float32 store SOURCE as a compact store at --out, without running the backbone.

    Block by block and resumable (rerun the same command after a kill); every chunk is checksummed; the new store's
    key records that it derives from SOURCE's.
    """
    from cachetune.cache.layout import LOSSY_REMOVED
    from cachetune.cache.storage_options import storage_options as use_storage_options

    if lossy:
        _fail(f"error: {LOSSY_REMOVED}", EXIT_INPUT)
    try:
        with use_storage_options([source, out], storage_options):
            state = _compact(source, dtype, reduce, codec, out, overwrite)
    except InputError as error:
        _fail(f"error: {error}", EXIT_INPUT)
    except OSError as error:
        _fail(f"error: writing {out} failed: {describe_os_error(error)}; fix that, then rerun the same command: it "
              "resumes where it stopped", EXIT_STORAGE)
    except KeyboardInterrupt as error:
        interrupted(error)
    click.echo(f"{out} is up to date (same source and settings); nothing to do" if state == "complete" else f"wrote {out}")


def _compact(source, dtype, reduce, codec, out, overwrite) -> str:
    from cachetune.cache.compact import check_request, compact as run_compact
    from cachetune.cache.store_lock import store_lock, store_reading
    from cachetune.stages.progress import progress_bar

    with store_reading(source):
        check_request(source, out, dtype, reduce)  # before the lock: a refused request leaves nothing at --out
        with store_lock(out, log=lambda line: click.echo(line, err=True)):
            return run_compact(source, out, dtype, reduce, codec, overwrite,
                               log=lambda line: click.echo(line, err=True), progress=progress_bar)


def _fail(line: str, code: int):
    click.echo(line, err=True)
    sys.exit(code)
