"""The entry-point wrapper of every stage script and CLI verb: user errors become one line and an exit code.

Settings that belong to the whole process (environment variables other libraries read, leaving the
torchrun process group) are made here, by entry points, never by library calls. The allocator setting
of the fixed-shape training stages is made before Python starts, in dvc.yaml (gptcore/training/allocator.py).

Kept apart from `gptcore.cli` (which knows every verb) so that a stage script's import closure, and
with it its DVC dependencies, is only what the stage uses.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable, Mapping

from gptcore.console import configure_logging
from gptcore.errors import GptcoreError, ProblemsError

DEBUG_ENV = "GPTCORE_DEBUG"
# Environment variables that name folders: a relative value means relative to where it was set. The
# entry point makes them absolute once, so child processes (DVC, torchrun workers, tests' repository
# copies) that start in another folder read the same place.
PATH_ENV = ("GPTCORE_MIRROR", "GPTCORE_CACHE")


def absolute_path_env(environ: dict[str, str] | None = None) -> None:
    """Rewrite each relative path in PATH_ENV as an absolute one, resolved against the current folder."""
    environ = os.environ if environ is None else environ
    for name in PATH_ENV:
        value = environ.get(name)
        if value and not os.path.isabs(os.path.expanduser(value)):
            environ[name] = os.path.abspath(os.path.expanduser(value))


def set_environ_defaults(defaults: Mapping[str, str]) -> None:
    """Set each variable the user has not set (for libraries that read them when imported)."""
    for name, value in defaults.items():
        os.environ.setdefault(name, value)


def run_entry(fn: Callable[[], int | None], debug: bool = False, verbosity: int = 0) -> int:
    """Run an entry point; user-facing errors become one line on stderr (a list of
    problems: one line each) and a non-zero exit.

    The library's log records print on stderr as plain lines around progress bars (gptcore.console):
    verbosity -1 shows only warnings, 0 adds information lines (the default), 1 adds debug lines.

    Relative folder variables (GPTCORE_MIRROR, GPTCORE_CACHE) are made absolute first. A traceback
    is shown only with --debug or GPTCORE_DEBUG=1. When the reader of our output has gone (a closed
    pipe: `... | head`, or a `tee` that exited on the same Ctrl-C), the exit is quiet. A torchrun
    process group that the run joined (gptcore.device.init_distributed) is left at the end.

    Returns:
        fn's exit code (0 for None); 1 after a user-facing error; 130 after Ctrl-C; 141 (128 + SIGPIPE,
        as a shell reports it) when stdout or stderr was closed by its reader.
    """
    debug = debug or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    configure_logging(1 if debug else verbosity)
    absolute_path_env()
    try:
        code = fn() or 0
        sys.stdout.flush()
        return code
    except KeyboardInterrupt:
        _print_error("interrupted")
        return 130
    except BrokenPipeError:
        _silence_closed_streams()
        return 141
    except ModuleNotFoundError as err:
        if debug or _extra_of(err) is None:
            raise
        _print_error(f"error: {_missing_extra_line(err)}")
        return 1
    except (GptcoreError, OSError, ValueError) as err:
        if debug:
            traceback.print_exc()
        _print_error(f"error: {_error_lines(err)}")
        return 1
    finally:
        _leave_process_group()


# Packages of the optional extras (pyproject.toml), by import name: a run that needs one that is not
# installed says which extra brings it, in one line.
_EXTRAS = {"fastapi": "serve", "starlette": "serve", "uvicorn": "serve", "llguidance": "serve", "gguf": "export"}
_EXTRAS |= {"transformers": "dev", "llama_cpp": "llama"}


def _extra_of(err: ModuleNotFoundError) -> str | None:
    return _EXTRAS.get((err.name or "").split(".")[0])


def _missing_extra_line(err: ModuleNotFoundError) -> str:
    extra = _extra_of(err)
    return (
        f"this needs the package {err.name!r}, from gptcore's {extra} extra: "
        f"pip install -c constraints.txt -e '.[{extra}]' (from the repository root)"
    )


def _error_lines(err: BaseException) -> str:
    """The error's message as one line (whitespace collapsed); a list of problems (ProblemsError) as its
    first line and one indented line per problem."""
    if isinstance(err, ProblemsError):
        first = str(err).splitlines()[0]
        return "\n  ".join([first, *(" ".join(problem.split()) for problem in err.problems)])
    return " ".join(str(err).split()) or type(err).__name__


def _leave_process_group() -> None:
    dist = sys.modules.get("torch.distributed")  # never imported here: most entry points have no torch
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _print_error(message: str) -> None:
    try:
        print(message, file=sys.stderr, flush=True)
    except (BrokenPipeError, ValueError):  # stderr's reader is gone; the exit code still tells
        _silence_closed_streams()


def _silence_closed_streams() -> None:
    """Point stdout and stderr at /dev/null, so that the interpreter's final flush does not fail
    again on the closed pipe (the recipe of Python's signal module documentation, "Note on SIGPIPE")."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    for stream in (sys.stdout, sys.stderr):
        try:
            os.dup2(devnull, stream.fileno())
        except (OSError, ValueError):
            pass
