"""Run folders: one writer at a time, and no finished or foreign results replaced by accident.

Every command that writes an output folder (``prepare``, ``pretrain``, ``finetune``, ``evaluate``, ``predict``,
``embed``, ``reconstruct``, ``demo``) opens it with :class:`RunFolder`:

- **a lock** (``OUT/.usfmae.lock``): ``flock`` on the file, so a second process writing the same folder is refused with
  one line naming the first (command, pid, host, start time). The kernel releases the lock when its process ends,
  even by ``kill -9``; a lock left behind can never block. Where ``flock`` is not available (some network file
  systems) the lock holds ``pid`` / ``host`` / process start time and a lock whose process is gone on this host is
  taken over (stale-lock detection);
- **a record** (``OUT/run.json``): command, ``status`` (``running`` / ``finished`` / ``failed`` / ``interrupted``),
  pid, host, times, version. A folder whose process died shows ``running`` with no lock holder: an interrupted run;
- **refusal** (:func:`check_run`) of a folder holding a *finished* run of the same command, a run of *another*
  command, or an *interrupted* run that could be resumed, unless the user says ``--resume`` (continue it, where the
  command can) or ``--overwrite`` (delete that run's own files first: only the names in :data:`RUN_OUTPUTS`, never
  anything else in the folder). ``prepare`` resumes by default (adding new files to a corpus is its normal use).

Folders written before ``run.json`` existed are recognised by their files (:data:`_SIGNATURES`).

Commands check early (:func:`check_run`, read-only, before any heavy work or any write), then open the folder
(:class:`RunFolder`, which takes the lock and checks again under it) only once their input has been accepted, so
bad input still writes nothing.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from typing_extensions import Self

from usfmae_core.errors import UsfmaeError

__all__ = [
    "LOCK_FILE",
    "RUN_FILE",
    "RUN_FOLDER_SKIPPED",
    "RUN_OUTPUTS",
    "RunFolder",
    "check_resume_arguments",
    "check_run",
    "lock_holder",
    "read_run",
    "run_folder_command",
]

RUN_FILE = "run.json"
LOCK_FILE = ".usfmae.lock"

# What each command writes at the top of its folder (names or simple globs). --overwrite deletes these, and only
# these, so a user's own files in the folder are never touched.
RUN_OUTPUTS: dict[str, tuple[str, ...]] = {
    "prepare": ("corpus.json", "manifest.jsonl", "done.jsonl", "report.json", "volumes.jsonl", "shards", "volumes"),
    "pretrain": ("checkpoint_last.pt", "model.pt", "metrics.jsonl", "summary.json", "loss_curve.png", "pictures",
                 "tb", "config.json"),
    "finetune": ("checkpoint_last.pt", "model.pt", "metrics.json", "history.csv", "curves.png", "datalist.json",
                 "config.json", "tensorboard", "fold_*", "cv_summary.json", "cv_summary.csv"),
    "evaluate": ("metrics.json", "metrics.csv", "predictions.csv", "confusion_matrix.png", "roc.png", "datalist.json",
                 "config.json"),
    "predict": ("predictions.csv", "summary.csv", "predictions.json", "attention.csv", "config.json"),
    "embed": ("embeddings.npy", "embeddings_index.csv", "embed.json", "config.json"),
    "reconstruct": ("reconstruct.json", "config.json"),  # + the pictures and volumes reconstruct.json lists
    "demo": ("report.md", "config.json", "learning_curves.png", "data", "corpus", "pretrain", "finetune_*", "eval_*",
             "predict", "reconstruct"),
}

# Folders written before run.json: recognised by a file only that command writes (first match wins).
_SIGNATURES: tuple[tuple[str, str], ...] = (
    ("corpus.json", "prepare"), ("checkpoint_last.pt", "pretrain"), ("metrics.jsonl", "pretrain"),
    ("history.csv", "finetune"), ("cv_summary.json", "finetune"), ("metrics.csv", "evaluate"),
    ("predictions.json", "predict"), ("embed.json", "embed"), ("reconstruct.json", "reconstruct"),
    ("report.md", "demo"),
)

# Commands that can continue an interrupted run, and the files (globs) that hold its state.
_RESUMABLE: dict[str, tuple[str, ...]] = {
    "pretrain": ("checkpoint_last.pt",),
    "finetune": ("checkpoint_last.pt", "fold_*/checkpoint_last.pt", "fold_*/metrics.json"),
    "prepare": ("done.jsonl",),
}


def _now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S")


def _process_start(pid: int) -> str | None:
    """The start time of process ``pid`` in clock ticks since boot (Linux), to tell a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode("ascii", "replace")
        return stat.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, start: str | None) -> bool:
    """Whether process ``pid`` (started at ``start``, when known) still runs on this host."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        pass
    now = _process_start(pid)
    return start is None or now is None or now == start


def _holder_text(info: dict[str, Any]) -> str:
    parts = [f"usfmae {info.get('command', '?')}"]
    if info.get("pid"):
        parts.append(f"pid {info['pid']}")
    if info.get("host"):
        parts.append(f"on {info['host']}")
    if info.get("started"):
        parts.append(f"since {info['started']}")
    return parts[0] + (f" ({', '.join(parts[1:])})" if len(parts) > 1 else "")


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


RUN_FOLDER_SKIPPED = "holds a usfmae {command} run (its outputs are not data)"


def run_folder_command(folder: str | os.PathLike) -> str | None:
    """The command whose run folder ``folder`` is (``finetune``, ``predict``, ...), else None: a folder walked for
    inputs skips such sub-folders, so the outputs of a run written inside a data folder (``--out data/run1``) never
    become data (a class named ``run1``, its ``curves.png`` an image)."""
    folder = Path(folder)
    record = _read_json(folder / RUN_FILE) or {}  # only run.json written by a run: a user's folder is never taken
    if record.get("command") and record.get("pid") is not None:
        return str(record["command"])
    try:
        return "usfmae" if (folder / LOCK_FILE).is_file() else None
    except OSError:  # a folder that cannot be read: the walk reports it, it is no run folder we could see
        return None


def read_run(out: str | os.PathLike) -> dict[str, Any] | None:
    """What ``out`` holds: ``run.json``'s record, or for a folder written before it existed ``{"command": ...,
    "status": "finished", "legacy": True}`` recognised from its files; None for a folder without a usfmae run."""
    out = Path(out)
    record = _read_json(out / RUN_FILE)
    if record is not None and record.get("command"):
        return record
    if not out.is_dir():
        return None
    for name, command in _SIGNATURES:
        if (out / name).exists():
            status = "finished"
            if command == "pretrain" and not (out / "model.pt").exists():
                status = "interrupted"
            return {"command": command, "status": status, "legacy": True}
    return None


# ----------------------------------------------------------------------------------------------------- the lock
def _flock(fd: int) -> bool | None:
    """Try an exclusive, non-blocking ``flock``: True (taken), False (held by another process), None (the file
    system does not support it)."""
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as err:
        if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        if err.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            return None
        raise


def lock_holder(out: str | os.PathLike) -> dict[str, Any] | None:
    """Who holds the lock of ``out`` now (``{"command", "pid", "host", "started"}``), or None when nobody does.
    Read-only for the folder (the lock file is opened for reading; nothing is created)."""
    path = Path(out) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        info = _read_json(path) or {}
        taken = _flock(fd)
        if taken is None:  # no flock here: judge by pid / host
            if info.get("host") == socket.gethostname() and not _alive(int(info.get("pid") or 0), info.get("start")):
                return None
            return info or None
        if taken:
            return None
        return info or {"command": "?"}
    finally:
        os.close(fd)  # closing releases a lock we may have taken just to test


class _Lock:
    """An exclusive lock on ``OUT/.usfmae.lock`` for the life of this object (see the module docstring)."""

    def __init__(self, out: Path, command: str) -> None:
        self.path = out / LOCK_FILE
        self.command = command
        self.fd: int | None = None

    def acquire(self) -> None:
        for _ in range(20):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                taken = self._take(fd)
            except OSError as err:
                os.close(fd)
                if err.filename is None:  # e.g. the disk is full: say where
                    raise OSError(err.errno, err.strerror, str(self.path)) from None
                raise
            except BaseException:
                os.close(fd)
                raise
            if taken:
                self.fd = fd
                return
            os.close(fd)  # the file was removed by its previous holder after we opened it: open the new one
        raise UsfmaeError(f"cannot lock {self.path}: it keeps being replaced", "check what else writes to the folder")

    def _take(self, fd: int) -> bool:
        """Lock the open lock file ``fd``; False when the path no longer names this file (retry)."""
        taken = _flock(fd)
        if taken is True:
            try:
                if os.stat(self.path).st_ino != os.fstat(fd).st_ino:
                    return False
            except FileNotFoundError:
                return False
        info = _read_json(self.path) or {}
        if taken is False:
            for _ in range(40):  # the holder writes who it is just after taking the lock: up to 2 s to name it
                if info.get("command"):
                    break
                time.sleep(0.05)
                info = _read_json(self.path) or {}
            raise UsfmaeError(f"{self.path.parent} is in use by {_holder_text(info)}",
                              "wait for that run to end, or choose another --out")
        if taken is None and info.get("pid") and int(info["pid"]) != os.getpid():
            if info.get("host") != socket.gethostname():
                raise UsfmaeError(f"{self.path.parent} is in use by {_holder_text(info)} (this file system "
                                  "cannot lock files, so whether it still runs cannot be checked from here)",
                                  f"wait for it to end; if it no longer runs, delete {self.path}")
            if _alive(int(info["pid"]), info.get("start")):
                raise UsfmaeError(f"{self.path.parent} is in use by {_holder_text(info)}",
                                  "wait for that run to end, or choose another --out")
            # a stale lock of a process that died on this host: taken over
        me = {"command": self.command, "pid": os.getpid(), "host": socket.gethostname(), "started": _now(),
              "start": _process_start(os.getpid())}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
        os.fsync(fd)
        return True

    def release(self) -> None:
        """Remove the lock file while still holding it, then let go (a process that opened it meanwhile sees that
        the path names another file, or none, and retries)."""
        if self.fd is None:
            return
        try:
            os.unlink(self.path)
        except OSError:
            pass
        os.close(self.fd)  # releases the flock
        self.fd = None


# ---------------------------------------------------------------------------------------------- the decision
def check_run(out: str | os.PathLike, command: str, resume: bool = False, overwrite: bool = False,
              replace_own: bool = False) -> str:
    """Decide what a new ``command`` run may do with folder ``out``, without writing anything.

    Args:
        out: the output folder.
        command: the command about to write it.
        resume: the user asked to continue a run (``--resume``; ``prepare`` always resumes).
        overwrite: the user asked to replace what the folder holds (``--overwrite``).
        replace_own: a finished run of the same command may be replaced without ``--overwrite`` (``demo``).

    Returns:
        ``"new"`` (nothing to keep: start afresh), ``"resume"`` (continue the run there: its state file exists),
        ``"replace"`` (delete the previous run's files first, then start afresh) or ``"finished"`` (``--resume`` of a
        run that has already finished: nothing to do unless the command can extend it).

    Raises:
        UsfmaeError: ``out`` is a file, is in use, or holds a run that must not be replaced without being asked.
    """
    out = Path(out)
    if resume and overwrite and command != "prepare":  # prepare always resumes: --overwrite alone decides there
        raise UsfmaeError("--resume and --overwrite contradict each other (continue the run, or delete it and start "
                          "again?)", "pass only one of them")
    if out.exists() and not out.is_dir():
        raise UsfmaeError(f"--out {out} is a file, not a folder", "choose a folder path (it is created if missing)")
    if not out.exists():
        return "new"
    holder = lock_holder(out)
    if holder is not None:
        raise UsfmaeError(f"{out} is in use by {_holder_text(holder)}",
                          "wait for that run to end, or choose another --out")
    return _decide(out, command, resume, overwrite, replace_own)


def _remove_outputs(out: Path, command: str) -> list[str]:
    """Delete the files and folders that ``command`` writes at the top of ``out``; returns their names."""
    removed = []
    listed: list[str] = []
    summary = _read_json(out / "reconstruct.json") if command == "reconstruct" else None
    if summary:  # reconstruct names its files after the input: take them from its summary
        listed = [str(p) for p in summary.get("pictures") or []] + [str(p) for p in
                                                                     (summary.get("volumes") or {}).values()]
    for p in (Path(x) for x in listed):
        if p.parent.resolve() == out.resolve() and p.is_file():
            p.unlink()
            removed.append(p.name)
    for pattern in RUN_OUTPUTS.get(command, ()) + (RUN_FILE,):
        for p in sorted(out.glob(pattern)):
            if p.name == LOCK_FILE:
                continue
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink(missing_ok=True)
            removed.append(p.name)
    return removed


class RunFolder:
    """The output folder of one run: locked while it runs, recorded in ``run.json`` (see the module docstring).

    Use as a context manager around the part of a command that writes ``out``::

        mode = check_run(out, "finetune", resume, overwrite)   # early: refuses before any work
        ...                                                       # check inputs, load data and models
        with RunFolder(out, "finetune", resume=resume, overwrite=overwrite, config=vars(args)) as run:
            ...                                                   # write into run.path
            run.finish()                                          # the results are complete

    Args:
        out: the folder (created).
        command: the command writing it.
        resume / overwrite / replace_own: as for :func:`check_run` (checked again once the lock is held).
        config: written to ``config.json`` when given (``func`` and keys starting with ``_`` left out).
        active: False in processes that must not write (ranks > 0 of a distributed run): then nothing happens.

    Attributes:
        mode: :func:`check_run`'s decision, taken under the lock.
        removed: names deleted for ``--overwrite`` (or to clear an interrupted run).
    """

    def __init__(self, out: str | os.PathLike, command: str, resume: bool = False, overwrite: bool = False,
                 config: dict[str, Any] | None = None, replace_own: bool = False, active: bool = True) -> None:
        self.path = Path(out)
        self.command, self.resume, self.overwrite, self.replace_own = command, resume, overwrite, replace_own
        self.config, self.active = config, active
        self.mode = "new"
        self.removed: list[str] = []
        self._lock: _Lock | None = None
        self._finished = False
        self._record: dict[str, Any] = {}

    def __enter__(self) -> Self:
        if not self.active:
            return self
        if self.path.exists() and not self.path.is_dir():
            raise UsfmaeError(f"--out {self.path} is a file, not a folder", "choose a folder path")
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock = _Lock(self.path, self.command)
        self._lock.acquire()
        try:
            self.mode = _decide(self.path, self.command, self.resume, self.overwrite, self.replace_own)
            if self.mode == "replace":
                prev = read_run(self.path) or {}
                self.removed = _remove_outputs(self.path, str(prev.get("command", self.command)))
            prev = read_run(self.path) if self.mode in ("resume", "finished") else None
            self._record = {"command": self.command, "status": "running", "pid": os.getpid(),
                            "host": socket.gethostname(), "started": _now(), "usfmae_version": _version(),
                            "runs": int((prev or {}).get("runs", 1 if prev else 0)) + 1}
            if prev and prev.get("first_started"):
                self._record["first_started"] = prev["first_started"]
            else:
                self._record["first_started"] = self._record["started"]
            self._write_record()
            if self.config is not None:
                from usfmae_core.fileio import write_json

                write_json(self.path / "config.json",
                           {k: v for k, v in self.config.items() if k != "func" and not str(k).startswith("_")},
                           default=_plain)
        except BaseException:
            self._lock.release()
            self._lock = None
            raise
        return self

    def _write_record(self) -> None:
        from usfmae_core.fileio import write_json

        write_json(self.path / RUN_FILE, self._record)

    def finish(self, **extra: Any) -> None:
        """Mark the run finished (its results are complete); ``extra`` plain values are added to ``run.json``."""
        if not self.active or self._lock is None:
            return
        self._record.update(status="finished", finished=_now(), **extra)
        self._write_record()
        self._finished = True

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if not self.active or self._lock is None:
            return
        try:
            if not self._finished:
                if exc_type is None:
                    self._record.update(status="finished", finished=_now())
                else:
                    from usfmae_core.errors import user_error_message

                    interrupted = issubclass(exc_type, KeyboardInterrupt)
                    self._record.update(status="interrupted" if interrupted else "failed", ended=_now())
                    if exc is not None and not interrupted:
                        self._record["error"] = (user_error_message(exc) or f"{exc_type.__name__}: {exc}")[:500]
                try:
                    self._write_record()
                except OSError:  # e.g. the disk is full: the record keeps saying "running" (= interrupted)
                    pass
        finally:
            self._lock.release()
            self._lock = None


def _decide(out: Path, command: str, resume: bool, overwrite: bool, replace_own: bool) -> str:
    """:func:`check_run`'s rules, for a folder nobody holds the lock of (or whose lock the caller holds)."""
    prev = read_run(out)
    if prev is None:
        return "new"
    prev_cmd, status = str(prev.get("command")), str(prev.get("status", "finished"))
    if status == "running":
        status = "interrupted"  # nobody holds the lock: the process that wrote "running" is gone
    when = prev.get("finished") or prev.get("started")
    when = f" at {when}" if when else ""
    if prev_cmd != command:
        if overwrite:
            return "replace"
        raise UsfmaeError(f"{out} holds a usfmae {prev_cmd} run ({status}{when}); {command} would mix its files "
                          "with that run's", f"choose another --out (e.g. {out / command}), or pass --overwrite to "
                          f"delete that {prev_cmd} run's files first")
    has_state = any(any(out.glob(pattern)) for pattern in _RESUMABLE.get(command, ()))
    if overwrite:
        return "replace"
    if command == "prepare":
        return "resume"
    if status == "finished":
        if resume:
            return "resume" if has_state else "finished"
        if replace_own:
            return "replace"
        more = " or --resume to continue it" if command == "pretrain" else ""
        raise UsfmaeError(f"{out} already holds a finished {command} run{when}",
                          f"choose another --out, or pass --overwrite to replace it{more}")
    if resume:
        return "resume" if has_state else "replace"
    if has_state:
        raise UsfmaeError(f"{out} holds an interrupted {command} run (started {prev.get('started', '?')}, "
                          f"{status}) that can be resumed",
                          "pass --resume to continue it, or --overwrite to start again from scratch")
    return "replace"  # nothing resumable was left: start again, without mixing in its partial files


def _version() -> str:
    from usfmae_core import __version__

    return __version__


def _plain(obj: Any) -> Any:
    """JSON fallback for run configs: paths and NumPy / torch scalars as plain values, anything else as text."""
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    item = getattr(obj, "item", None)
    if callable(item):
        try:
            return item()
        except (TypeError, ValueError):
            pass
    tolist = getattr(obj, "tolist", None)
    if callable(tolist):
        return tolist()
    return str(obj)


# ------------------------------------------------------------------------------------------ resume arguments
def check_resume_arguments(given: dict[str, Any], stored: dict[str, Any], defaults: dict[str, Any],
                           fixed: tuple[str, ...], free: tuple[str, ...] = (), where: str = "the run"
                           ) -> list[str]:
    """Compare the arguments of ``--resume`` with those the run was started with.

    An argument counts as given when it differs from its default (``defaults``); it conflicts when it also differs
    from the run's value (``stored``).

    Args:
        given: this invocation's arguments.
        stored: the run's arguments (from its checkpoint).
        defaults: the parser's defaults (unknown keys: compared as given).
        fixed: arguments that define the model or the data: a conflict is an error.
        free: arguments that may change freely (device, workers, logging); not reported.
        where: the run, for messages.

    Returns:
        one warning per other conflicting argument (the resumed run then differs from an uninterrupted one).

    Raises:
        UsfmaeError: a conflict in a ``fixed`` argument.
    """
    def same(a: Any, b: Any) -> bool:
        norm = lambda v: [float(x) for x in v] if isinstance(v, (list, tuple)) else (  # noqa: E731
            str(v) if isinstance(v, os.PathLike) else v)
        try:
            return norm(a) == norm(b)
        except (TypeError, ValueError):
            return a == b

    warnings: list[str] = []
    errors: list[str] = []
    for key, value in given.items():
        if key in free or key.startswith("_") or key not in stored:
            continue
        if key in defaults and same(value, defaults[key]):
            continue  # not given on this command line: the run's value is used
        if same(value, stored[key]):
            continue
        flag = "--" + key.replace("_", "-")
        text = f"{flag} {_show(value)} (the run used {_show(stored[key])})"
        (errors if key in fixed else warnings).append(text)
    if errors:
        raise UsfmaeError(f"--resume with arguments that change {where}: {'; '.join(errors)}",
                          "resume with the run's arguments (or leave them out), or start a new run (--overwrite or "
                          "another --out)")
    return warnings


def _show(v: Any) -> str:
    if v is None:  # not given: the command chose its default (e.g. an lr scaled from --blr)
        return "its default"
    if isinstance(v, (list, tuple)):
        return " ".join(str(x) for x in v)
    return str(v)
