"""How the `pipeline` command ends on a fault: one line on stderr and a documented exit code, never a traceback
(README, "Faults and exit codes"); click's usage errors as one line too."""
from __future__ import annotations

import os
import signal
import sys
import threading
from functools import wraps

import click

from cachetune.cache.errors import (EXIT_INPUT, EXIT_INTERRUPTED, EXIT_STORAGE, EXIT_TERMINATED, InputError, StorageError,
                                    describe_os_error, file_in_the_way)

INTERRUPTED = "interrupted; rerun the same command to resume"


def user_errors(function):
    """Faults end in one line on stderr and a documented exit code, never a traceback: bad input 2, an OS
    error on the store or a model folder (full disk, permissions) 3, Ctrl-C 130, SIGTERM 143. A closed stdout (the reader of
    a pipe quit: `pipeline info | head -1`) is no fault: a quiet exit 0."""

    @wraps(function)
    def run(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except BrokenPipeError:
            quiet_exit()
        except InputError as error:
            fail(f"error: {error}", EXIT_INPUT)
        except StorageError as error:
            fail(f"error: {error}", EXIT_STORAGE)
        except OSError as error:
            blocked = file_in_the_way(error)
            if blocked:
                fail(f"error: {blocked}", EXIT_INPUT)
            fail(f"error: {describe_os_error(error)}; fix that (free space, permissions), then rerun the same command",
                  EXIT_STORAGE)
        except KeyboardInterrupt as error:
            interrupted(error)

    return run


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C's KeyboardInterrupt would be: the same unwinding (locks released, partial
    files removed) and the same line."""


def stop_on_sigterm():
    """SIGTERM (docker stop, Kubernetes, Slurm) ends a command as Ctrl-C does, with exit 143. Only Python's main
    thread may set a handler (a command invoked from another thread keeps SIGTERM's default)."""

    def terminate(signum, frame):
        raise Terminated

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, terminate)


def interrupted(error: KeyboardInterrupt):
    """The line of Ctrl-C and SIGTERM; the exit code says which (130 or 143)."""
    fail(INTERRUPTED, EXIT_TERMINATED if isinstance(error, Terminated) else EXIT_INTERRUPTED)


def quiet_exit():
    """stdout is pointed at /dev/null first, so the interpreter's last flush cannot fail (and print) again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (AttributeError, ValueError, OSError):  # no real file descriptor (a test runner's stdout)
        pass
    sys.exit(0)


def fail(line: str, code: int):
    """The line comes last: progress bars left open by the fault are closed first, so none redraws after it."""
    if "tqdm" in sys.modules:
        from tqdm import tqdm

        for bar in list(getattr(tqdm, "_instances", ())):
            bar.close()
    click.echo(line, err=True)
    sys.exit(code)


NO_ARGS_IS_HELP = getattr(click.exceptions, "NoArgsIsHelpError", ())  # click >= 8.2


class OneLineUsageError(click.ClickException):
    """A click usage error (an unknown option, a value outside the choices) shown as every other bad input is: one
    `error:` line naming the command's --help, exit 2, instead of click's usage block."""

    exit_code = EXIT_INPUT

    def show(self, file=None):
        click.echo(f"error: {self.message}", err=True)


class PipelineGroup(click.Group):
    """The `pipeline` group; its own and its commands' usage errors become `OneLineUsageError`s."""

    @staticmethod
    def _one_line(error: click.UsageError) -> click.ClickException:
        if isinstance(error, NO_ARGS_IS_HELP):  # bare `pipeline`: click's help, as before
            return error
        path = error.ctx.command_path if error.ctx else "pipeline"
        return OneLineUsageError(f"{error.format_message().rstrip('.')}; see `{path} --help`")

    def make_context(self, *args, **kwargs):
        try:
            return super().make_context(*args, **kwargs)
        except click.UsageError as error:
            raise self._one_line(error) from None

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except click.UsageError as error:
            raise self._one_line(error) from None
