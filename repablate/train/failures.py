"""How a run that does not complete tells what stopped it (docs/FAILURE_MODES.md): a signal (``RunInterrupted``,
raised by ``interrupt_on_signals``; ``as_interruption`` reads Lightning's and Python's own forms of it) or an error
in a DataLoader worker (``dataloader_worker_error``: the worker's own error, out of torch's re-raise of it).
"""

from __future__ import annotations

import re
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

INTERRUPTING_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class RunInterrupted(BaseException):
    """SIGINT or SIGTERM arrived. A BaseException, like KeyboardInterrupt, so that no ``except Exception`` on its
    way up (Lightning's, Hydra's job runner's) turns it into a failed job: the run, or the whole sweep, stops."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"received {signal.Signals(signum).name}")


@contextmanager
def interrupt_on_signals(signums: tuple[int, ...] = INTERRUPTING_SIGNALS) -> Iterator[None]:
    """While active, each of ``signums`` raises ``RunInterrupted`` in the main thread.

    Lightning's own SIGTERM handling (inside fit) only sets a flag and later raises ``SIGTERMException``, a
    ``SystemExit`` with code 0, and it turns KeyboardInterrupt into ``sys.exit(1)``: neither says "interrupted".
    Lightning keeps a handler it finds installed and calls it after its own, so this one still runs during fit.
    """

    def interrupt(signum: int, frame) -> None:
        raise RunInterrupted(signum)

    previous = {}
    try:
        for signum in signums:
            previous[signum] = signal.signal(signum, interrupt)
    except ValueError:  # not the main thread (a launcher's worker): leave the process's handlers alone
        pass
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def as_interruption(error: BaseException) -> RunInterrupted | None:
    """The signal interruption ``error`` stands for, if any: ours, a KeyboardInterrupt, or Lightning's
    SIGTERMException (when no ``interrupt_on_signals`` handler was installed, e.g. a run started from Python)."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    if isinstance(error, RunInterrupted):
        return error
    if isinstance(error, KeyboardInterrupt):
        return RunInterrupted(signal.SIGINT)
    if isinstance(error, SIGTERMException):
        return RunInterrupted(signal.SIGTERM)
    return None


WORKER_ERROR = re.compile(
    r"Caught (?P<type>\w+) (?P<where>in DataLoader worker process \d+)\.\nOriginal (?P<traceback>Traceback .*)",
    re.DOTALL,
)


@dataclass(frozen=True)
class WorkerError:
    """An error raised in a DataLoader worker: its type's name, its own message, where, and its traceback there."""

    type_name: str
    message: str
    where: str
    traceback: str


def dataloader_worker_error(error: BaseException) -> WorkerError | None:
    """The error a DataLoader worker raised, when ``error`` is torch's re-raise of it in the main process, whose
    message is the worker's whole traceback ("Caught ValueError in DataLoader worker process 0. Original
    Traceback ..."; a ``RuntimeError`` when the type cannot be rebuilt from one message); None otherwise."""
    match = WORKER_ERROR.match(str(error))
    if match is None:
        return None
    name, text = match["type"], match["traceback"].rstrip()
    # The traceback ends on "<module.>Type: message" (the message may span lines); frames above it are indented.
    lines = list(re.finditer(rf"^(?:[\w.]+\.)?{re.escape(name)}(?:: |$)", text, re.MULTILINE))
    message = text[lines[-1].end() :].strip() if lines else text.splitlines()[-1]
    return WorkerError(name, message, match["where"], text)
