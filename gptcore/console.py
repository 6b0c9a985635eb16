"""What reaches the user's terminal from the library: log records written around tqdm's progress bars,
to a stream that survives its reader going away. Entry points (the CLI, the stage scripts) call
`configure_logging`; the library only logs (`logging.getLogger(__name__)`)."""

from __future__ import annotations

import logging
import sys

PACKAGE_LOGGER = "gptcore"
VERBOSITY = {-1: logging.WARNING, 0: logging.INFO, 1: logging.DEBUG}  # --quiet, default, -v


class GuardedStream:
    """A text stream that survives its reader going away: a write to a closed pipe (EPIPE, e.g. the
    `tee` of `dvc repro | tee log` exited on the same Ctrl-C) is dropped and sets `broken`, which
    the loop treats as a stop request, so progress is saved rather than lost to a BrokenPipeError."""

    def __init__(self, stream):
        self.stream = stream
        self.broken = False

    def write(self, text: str) -> int:
        if not self.broken:
            try:
                self.stream.write(text)
            except (BrokenPipeError, ValueError):  # ValueError: the stream was closed
                self.broken = True
        return len(text)

    def flush(self) -> None:
        if not self.broken:
            try:
                self.stream.flush()
            except (BrokenPipeError, ValueError):
                self.broken = True


class ProgressBarHandler(logging.Handler):
    """Writes each record as one plain line on stderr, around any tqdm bar (tqdm.write), dropped if
    stderr's reader is gone."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm.auto import tqdm  # only once something is logged: an entry point's --help stays light

        try:
            tqdm.write(self.format(record), file=GuardedStream(sys.stderr))
        except Exception:  # logging must never take the program down
            self.handleError(record)


class PlainFormatter(logging.Formatter):
    """The message alone; a warning that does not say so itself gets a `warning: ` prefix."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.levelno >= logging.WARNING and not message.startswith(("warning:", "error:")):
            message = f"warning: {message}"
        return message


def configure_logging(verbosity: int = 0) -> None:
    """Send gptcore's log records at the chosen level (-1 quiet: warnings and errors; 0: info; 1: debug)
    to stderr as plain lines. Calling it again replaces the handler it installed."""
    logger = logging.getLogger(PACKAGE_LOGGER)
    for handler in list(logger.handlers):
        if isinstance(handler, ProgressBarHandler):
            logger.removeHandler(handler)
    handler = ProgressBarHandler()
    handler.setFormatter(PlainFormatter())
    logger.addHandler(handler)
    logger.setLevel(VERBOSITY[max(-1, min(1, verbosity))])
    logger.propagate = False
