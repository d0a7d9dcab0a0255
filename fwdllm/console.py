"""What the `fwdllm` command shows on the terminal, and where library output goes instead.

fwdllm is run from scripts (`fwdllm inspect --json B | jq .theta`), so the terminal carries
fwdllm's own lines only: each command's results on stdout and, on stderr, the records of the
``fwdllm.*`` loggers from INFO up, which are the commands' progress (the export's steps, the
coordinator's "serving" and per-step lines, a device's line per task). Libraries say much more:
torchao and torch warn while they load, transformers draws progress bars, litert-torch and the
quantizer print converter progress, TensorFlow's absl logs from C++. All of that goes to a log
file, ``$FWDLLM_CACHE/logs/<command>-<time>-<pid>.log`` (``~/.cache/fwdllm`` by default),
created only once something is written to it and named in the error line when a command fails.
``-v`` shows library output on the terminal as well, ``-vv`` adds debug records.

Library output takes three routes: the ``logging`` of torchao, transformers, TensorFlow and the
rest (the root logger's handlers below), Python ``warnings`` (routed into logging), and plain
writes to file descriptors 1 and 2 (torch's own log handler, converter progress, C++ logs).
The third route is closed only inside ``library_output_to_log()``, which points both
descriptors at the log file while fwdllm's records keep reaching the terminal; a command wraps
its library-heavy work (an export) in it. Not every command can: ``serve`` and ``simulate`` draw
their own progress bars on stderr.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from pathlib import Path

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LOGS_KEPT = 50  # the newest log files are kept; older ones are removed when a new one is created

_active: Console | None = None


def log_folder() -> Path:
    return Path(os.environ.get("FWDLLM_CACHE", Path.home() / ".cache" / "fwdllm")) / "logs"


def _fwdllm_or_error(record: logging.LogRecord) -> bool:
    """The terminal's filter at default verbosity: fwdllm's own records, and anyone's errors."""
    return record.name == "fwdllm" or record.name.startswith("fwdllm.") or record.levelno >= logging.ERROR


def _age(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:  # removed meanwhile by another fwdllm process
        return 0.0


class _LogFile(logging.FileHandler):
    """A log file that appears (with its folder) only when the first record or descriptor write arrives."""

    def __init__(self, path: Path):
        super().__init__(path, delay=True, encoding="utf-8")

    def _open(self):
        folder = Path(self.baseFilename).parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
            stream = super()._open()
        except OSError:  # an unwritable cache (a phone's shell): library output is dropped, `-v` still shows it
            return open(os.devnull, "w", encoding="utf-8")
        with contextlib.suppress(OSError):
            for old in sorted(folder.glob("*.log"), key=_age)[:-LOGS_KEPT]:
                old.unlink(missing_ok=True)
        return stream

    def open_now(self) -> None:
        self.acquire()
        try:
            if self.stream is None:
                self.stream = self._open()
        finally:
            self.release()


class Console:
    """The logging of one command: installed on the root logger on entry, removed again on exit,
    so that ``main()`` called in-process (tests) leaves the process's logging as it found it."""

    def __init__(self, command: str, verbosity: int):
        self.verbosity = verbosity
        self.path = log_folder() / f"{command}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
        self.file = _LogFile(self.path)
        self.terminal = logging.StreamHandler(sys.stderr)
        if verbosity == 0:
            self.terminal.addFilter(_fwdllm_or_error)
        for handler in (self.file, self.terminal):
            handler.setFormatter(logging.Formatter(FORMAT))

    @property
    def written(self) -> bool:
        """Whether anything reached the log file (then an error line names it)."""
        return self.path.is_file()

    def __enter__(self) -> Console:
        global _active
        root = logging.getLogger()
        self._root_level = root.level
        root.setLevel(logging.DEBUG if self.verbosity >= 2 else logging.INFO)
        root.addHandler(self.file)
        root.addHandler(self.terminal)
        logging.captureWarnings(True)
        _active = self
        return self

    def __exit__(self, *exc) -> None:
        global _active
        _active = None
        logging.captureWarnings(False)
        root = logging.getLogger()
        root.removeHandler(self.terminal)
        root.removeHandler(self.file)
        root.setLevel(self._root_level)
        self.file.close()


@contextlib.contextmanager
def library_output_to_log():
    """File descriptors 1 and 2 into the command's log file for the block; fwdllm's records still reach the
    terminal. Does nothing with ``-v`` (library output is wanted then) or outside a command."""
    console = _active
    if console is None or console.verbosity > 0:
        yield
        return
    console.file.open_now()
    sys.stdout.flush()
    sys.stderr.flush()
    saved_out, saved_err = os.dup(1), os.dup(2)
    target = os.open(console.path if console.written else os.devnull, os.O_WRONLY | os.O_APPEND)
    terminal = None
    if _descriptor(console.terminal.stream) == 2:  # else (tests) the handler does not write to fd 2 anyway
        terminal = open(saved_err, "w", encoding="utf-8", errors="backslashreplace", closefd=False)
        previous = console.terminal.setStream(terminal)
    os.dup2(target, 1)
    os.dup2(target, 2)
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved_out, 1)
        os.dup2(saved_err, 2)
        if terminal is not None:
            console.terminal.setStream(previous)
            terminal.close()
        for fd in (target, saved_out, saved_err):
            os.close(fd)


def _descriptor(stream) -> int | None:
    try:
        return stream.fileno()
    except (AttributeError, OSError, ValueError):  # StringIO and pytest's capture have none
        return None
