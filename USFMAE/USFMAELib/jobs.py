"""Background jobs in a child process, watched without blocking and cancelled as a whole tree.

Everything that needs torch runs this way (classify, reconstruct, fine-tune, pretrain, model import and info,
device check, sample data, weight download), so the Slicer process never imports torch and its GUI never waits.
The child prints ordinary log lines and, with ``USFMAE_PROGRESS_LINES=1``, machine-readable progress lines
(``USFMAE_PROGRESS {json}``, see :mod:`usfmae_core.workflows.common`) and results of function steps
(``USFMAE_RESULT {json}``, see ``Scripts/usfmae_job.py``). A reader thread moves every output line into a queue;
:meth:`Job.poll` (called from a GUI timer, or in a loop) drains the queue without ever blocking, keeps the latest
progress record, the results and the log, and notices when the child has ended.

Why not ``slicer.util.launchConsoleProcess``: in Slicer the child is ``PythonSlicer``, a launcher that starts the
real interpreter as its own child (which may start data-loader workers in turn), so killing the direct child leaves
the others running. The child is therefore started in its own session / process group (POSIX) or process group
(Windows), and :meth:`Job.cancel` signals the whole group: SIGTERM first (the job script turns it into
KeyboardInterrupt, so finished checkpoints are kept), SIGKILL for whatever is left after ``timeout`` seconds.
The environment is the caller's (the module passes ``slicer.util.startupEnvironment()``, as
``launchConsoleProcess`` does).

No Qt here: the module's widget polls a :class:`Job` from a ``qt.QTimer``; the tests poll it in a loop.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any

PROGRESS_PREFIX = "USFMAE_PROGRESS "  # the engine's (usfmae_core.workflows.common.PROGRESS_PREFIX; a test compares)
ERROR_PREFIX = "usfmae: error:"  # the engine's one-line user errors (usfmae_core.cli)
RESULT_PREFIX = "USFMAE_RESULT "  # Scripts/usfmae_job.py: {"step": name, "value": <JSON>} of a function step
_EOF = object()


def _parse_record(line: str, prefix: str) -> dict[str, Any] | None:
    """The JSON object of a ``<prefix>{...}`` line, or None. Parsed here rather than with the engine's parser:
    that module imports torch, which the Slicer process must not load (only child jobs do)."""
    line = line.strip()
    if not line.startswith(prefix):
        return None
    try:
        record = json.loads(line[len(prefix):])
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) else None


def _parse_progress(line: str) -> dict[str, Any] | None:
    return _parse_record(line, PROGRESS_PREFIX)


class Job:
    """A child process whose output is read in the background and whose whole process tree can be cancelled.

    Args:
        argv: the command (executable first).
        env: the child's environment (default: this process's); ``USFMAE_PROGRESS_LINES=1`` and
            ``PYTHONUNBUFFERED=1`` are added so progress arrives line by line.
        cwd: the child's working folder.
        name: a label for logs and the GUI.
        max_log_lines: how many log lines to keep (older ones are dropped).
        on_line: optional callback for each log line (not for progress lines), called from :meth:`poll`.

    Example::

        job = Job([sys.executable, "-m", "usfmae_core.cli", "info"]).start()
        while job.running:
            job.poll(); time.sleep(0.1)
        job.returncode, job.log[-1]
    """

    def __init__(self, argv: Sequence[str], env: Mapping[str, str] | None = None, cwd: str | os.PathLike | None = None,
                 name: str = "job", max_log_lines: int = 5000, on_line: Callable[[str], None] | None = None) -> None:
        self.argv = [str(a) for a in argv]
        self.env = dict(os.environ if env is None else env)
        self.env.update(USFMAE_PROGRESS_LINES="1", PYTHONUNBUFFERED="1", PYTHONIOENCODING="utf-8")
        self.cwd = None if cwd is None else str(cwd)
        self.name = name
        self.on_line = on_line
        self.log: deque[str] = deque(maxlen=max_log_lines)
        self.progress: dict[str, Any] | None = None
        self.results: dict[str, Any] = {}  # step name -> value printed by a function step (RESULT_PREFIX lines)
        self.spec: Any = None  # what started it (USFMAELib.logic.JobSpec), for finishing
        self.returncode: int | None = None
        self.cancelled = False
        self.proc: subprocess.Popen | None = None
        self.started_at: float | None = None
        self.ended_at: float | None = None
        self._queue: queue.Queue = queue.Queue()
        self._reader: threading.Thread | None = None
        self._reader_done = False
        self._exited_at: float | None = None
        self._kill_deadline: float | None = None

    # ------------------------------------------------------------------------------------------------ start
    def start(self) -> Job:
        """Start the child in its own process group and the background reader; returns ``self``."""
        if self.proc is not None:
            raise RuntimeError(f"job '{self.name}' was already started")
        kwargs: dict[str, Any] = {"stdin": subprocess.DEVNULL, "stdout": subprocess.PIPE, "stderr": subprocess.STDOUT,
                                  "text": True, "encoding": "utf-8", "errors": "replace", "bufsize": 1, "env": self.env,
                                  "cwd": self.cwd}
        if os.name == "posix":
            kwargs["start_new_session"] = True  # own session and process group: the group id is the child's pid
        else:
            kwargs["creationflags"] = (getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0)
                                       | getattr(subprocess, "CREATE_NO_WINDOW", 0))
        self.proc = subprocess.Popen(self.argv, **kwargs)
        self.started_at = time.monotonic()
        self._reader = threading.Thread(target=self._read, name=f"usfmae-job-{self.name}", daemon=True)
        self._reader.start()
        return self

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        try:
            for line in self.proc.stdout:
                self._queue.put(line.rstrip("\r\n"))
        except (OSError, ValueError):  # pipe closed under us
            pass
        finally:
            self._queue.put(_EOF)

    # ------------------------------------------------------------------------------------------------- poll
    def poll(self) -> list[str]:
        """Take what the child has written so far, without blocking. Returns the new log lines (progress lines are
        parsed into :attr:`progress` instead); updates :attr:`returncode` once the child has ended."""
        new: list[str] = []
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is _EOF:
                self._reader_done = True
                continue
            record = _parse_progress(item)
            if record is not None:
                self.progress = record
                continue
            result = _parse_record(item, RESULT_PREFIX)
            if result is not None and "step" in result:
                self.results[str(result["step"])] = result.get("value")
                continue
            self.log.append(item)
            new.append(item)
            if self.on_line is not None:
                self.on_line(item)
        self._check_exit()
        return new

    def _check_exit(self) -> None:
        if self.proc is None or self.returncode is not None:
            return
        if self._kill_deadline is not None and time.monotonic() >= self._kill_deadline:
            self._signal_tree(hard=True)
            self._kill_deadline = None
        code = self.proc.poll()
        if code is None:
            return
        now = time.monotonic()
        if self._exited_at is None:
            self._exited_at = now
        # all output read, or an orphaned grandchild still holds the pipe open: do not wait for it forever
        if self._reader_done or now - self._exited_at > 2.0:
            self.returncode = code
            self.ended_at = now

    @property
    def running(self) -> bool:
        """True from :meth:`start` until the child has ended and its output has been read."""
        return self.proc is not None and self.returncode is None

    def error(self) -> str | None:
        """The last one-line user error the child printed (after ``usfmae: error:``), or None."""
        for line in reversed(self.log):
            if line.startswith(ERROR_PREFIX):
                return line[len(ERROR_PREFIX):].strip()
        return None

    @property
    def fraction(self) -> float | None:
        """Done fraction of the current stage from the latest progress line, or None."""
        p = self.progress or {}
        step, total = p.get("step"), p.get("total")
        if not isinstance(step, (int, float)) or not isinstance(total, (int, float)) or total <= 0:
            return None
        return max(0.0, min(1.0, step / total))

    @property
    def eta_s(self) -> float | None:
        """Seconds left in the current stage (the child's estimate), or None."""
        eta = (self.progress or {}).get("eta_s")
        return float(eta) if isinstance(eta, (int, float)) else None

    @property
    def elapsed_s(self) -> float:
        if self.started_at is None:
            return 0.0
        return (self.ended_at or time.monotonic()) - self.started_at

    def status_text(self) -> str:
        """One line for the GUI: stage, step / total, ETA and the latest metrics."""
        if self.proc is None:
            return "not started"
        if self.returncode is not None:
            what = "cancelled" if self.cancelled else ("finished" if self.returncode == 0 else
                                                       f"failed (exit code {self.returncode})")
            return f"{self.name} {what} after {format_seconds(self.elapsed_s)}"
        p = self.progress
        if not p:
            return f"{self.name}: starting ({format_seconds(self.elapsed_s)})"
        text = f"{p.get('stage', self.name)}: {p.get('step', '?')}/{p.get('total', '?')}"
        if self.eta_s is not None:
            text += f", {format_seconds(self.eta_s)} left"
        extras = [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in p.items()
                  if k not in ("stage", "step", "total", "elapsed_s", "eta_s") and isinstance(v, (int, float, str))]
        if extras:
            text += " (" + ", ".join(extras[:4]) + ")"
        return text

    # ------------------------------------------------------------------------------------------------ stop
    def _signal_tree(self, hard: bool) -> None:
        """Signal the child's whole process group (POSIX) / tree (Windows); silent when it is already gone."""
        if self.proc is None:
            return
        pid = self.proc.pid
        if os.name == "posix":
            try:
                os.killpg(pid, signal.SIGKILL if hard else signal.SIGTERM)
            except (ProcessLookupError, PermissionError):
                pass
        else:  # taskkill /T walks the tree; /F forces
            args = ["taskkill", "/PID", str(pid), "/T"] + (["/F"] if hard else [])
            subprocess.run(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)

    def request_cancel(self, timeout: float = 5.0) -> None:
        """Ask the process tree to stop (SIGTERM / taskkill) and return at once; :meth:`poll` kills what is left
        ``timeout`` seconds later."""
        if self.proc is None or self.returncode is not None:
            return
        self.cancelled = True
        self._signal_tree(hard=False)
        self._kill_deadline = time.monotonic() + timeout

    def _group_alive(self) -> bool:
        if self.proc is None:
            return False
        if os.name != "posix":
            return self.proc.poll() is None
        try:
            os.killpg(self.proc.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def cancel(self, timeout: float = 5.0) -> int | None:
        """Stop the whole process tree and wait for it: terminate, then kill after ``timeout`` seconds.

        Returns the child's exit code (negative signal number on POSIX when it was killed by a signal).
        """
        if self.proc is None:
            return None
        if self.proc.poll() is None or self._group_alive():
            self.cancelled = self.cancelled or self.proc.poll() is None
            self._signal_tree(hard=False)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and (self.proc.poll() is None or self._group_alive()):
                time.sleep(0.05)
            if self.proc.poll() is None or self._group_alive():
                self._signal_tree(hard=True)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL cannot be ignored
            pass
        self._kill_deadline = None
        end = time.monotonic() + 2.0
        while self.returncode is None and time.monotonic() < end:
            self.poll()
            time.sleep(0.02)
        if self.returncode is None:
            self.returncode = self.proc.returncode
            self.ended_at = time.monotonic()
        return self.returncode

    def wait(self, timeout: float | None = None, interval: float = 0.05) -> int | None:
        """Poll until the job ends (or ``timeout`` seconds pass); returns the exit code or None on timeout."""
        end = None if timeout is None else time.monotonic() + timeout
        while self.running:
            self.poll()
            if not self.running:
                break
            if end is not None and time.monotonic() >= end:
                return None
            time.sleep(interval)
        return self.returncode


def format_seconds(seconds: float) -> str:
    """``75`` -> ``1 min 15 s``; ``3700`` -> ``1 h 01 min``."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, secs = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"
