"""Writing result files so that they survive a crash, a power cut and odd file names (light: no torch, no numpy).

Every file a run writes goes through :func:`atomic_write`: a temporary file in the same folder, flushed and
``fsync``'ed, renamed over the target (``os.replace``, atomic on POSIX), then the folder itself is ``fsync``'ed so the
rename is on disk too. A reader therefore sees the old file or the new one, never a torn one, after a ``kill -9`` or
a power cut. Failures become ``OSError`` naming the target file (``usfmae_core.errors.user_error_message`` turns them
into one line); the temporary file is removed.

File names that are not valid UTF-8 reach Python as surrogate-escaped ``str``. :func:`printable` turns them into
valid text (the undecodable bytes as ``\\xNN``), so CSV / console output never fails on them; JSON keeps them
exactly (``\\udcNN`` escapes, which ``json.load`` turns back into the file's real name).
"""

from __future__ import annotations

import csv
import errno
import io
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import IO, Any

__all__ = [
    "append_line",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_text",
    "fsync_dir",
    "fsync_file",
    "printable",
    "umask_mode",
    "write_csv",
    "write_json",
]

# torch.save reports a failed write as a RuntimeError without an errno; these are its words for it
_WRITE_FAILURE_WORDS = ("PytorchStreamWriter failed", "file write failed", "unexpected pos", "iostream error")


def umask_mode(path: str | os.PathLike) -> None:
    """Give ``path`` the usual permissions of a new file (0666 minus the umask); ``mkstemp`` creates 0600 files."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def fsync_dir(folder: str | os.PathLike) -> None:
    """``fsync`` a folder, so that renames and new entries in it are on disk (no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems (e.g. certain network mounts) refuse fsync on folders: nothing to do
        pass
    finally:
        os.close(fd)


def fsync_file(path: str | os.PathLike) -> None:
    """``fsync`` a file written by another library (e.g. SimpleITK), before it is renamed into place."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _free_bytes(folder: Path) -> int | None:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def _file_size_limited() -> bool:
    """Whether this process may write files only up to a size (``ulimit -f``, ``RLIMIT_FSIZE``)."""
    try:
        import resource
    except ImportError:  # Windows
        return False
    soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    return soft != resource.RLIM_INFINITY


def _as_os_error(err: BaseException, path: Path) -> OSError | None:
    """``err`` (a failed write) as an ``OSError`` that names ``path``; None when it is not a write failure."""
    if isinstance(err, OSError):
        code = err.errno
        reason = err.strerror
    elif isinstance(err, RuntimeError) and any(w in str(err) for w in _WRITE_FAILURE_WORDS):
        code, reason = None, None
    else:
        return None
    if code is None:  # numpy / torch give "N requested and M written" or an iostream error: usually a full disk
        free = _free_bytes(path.parent)
        code = errno.ENOSPC if free is not None and free < (64 << 20) else errno.EIO
        if code == errno.EIO and _file_size_limited():  # ulimit -f: the write stopped at the limit (EFBIG)
            code = errno.EFBIG
        reason = (os.strerror(code) if code != errno.EIO else f"write failed: {str(err).splitlines()[0][:120]}")
    return OSError(code, reason or os.strerror(code), str(path))


def atomic_write(path: str | os.PathLike, write: Callable[[IO[Any]], None], text: bool = False) -> Path:
    """Write ``path`` atomically and durably: ``write(f)`` fills a temporary file in the same folder, which is
    flushed, ``fsync``'ed and renamed over ``path``; the folder is ``fsync``'ed after the rename.

    Args:
        path: the file to (re)write; its folder is created when missing.
        write: called with the open temporary file (binary, or UTF-8 text with ``newline=""`` when ``text``).
        text: open the temporary file in text mode.

    Raises:
        OSError: the folder cannot be created or written, the disk is full, ``path`` is a folder, ... (with
            ``filename`` = ``path``); a failed ``torch.save`` is reported the same way.
    """
    path = Path(path)
    folder = path.parent
    folder.mkdir(parents=True, exist_ok=True)
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, "a folder of that name is in the way", str(path))
    # a short prefix: the temporary name must stay under the 255-byte limit when the target's name is long
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name[:40]}.", suffix=".tmp", dir=folder)
    except OSError as err:  # name the file the user asked for, not the temporary one
        raise OSError(err.errno, err.strerror, str(path)) from None
    try:
        with os.fdopen(fd, "w" if text else "wb", **({"encoding": "utf-8", "newline": ""} if text else {})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        umask_mode(tmp)
        os.replace(tmp, path)
    except BaseException as err:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        converted = _as_os_error(err, path)
        if converted is not None and converted is not err:
            raise converted from err
        raise
    fsync_dir(folder)
    return path


def atomic_write_text(path: str | os.PathLike, content: str) -> Path:
    """:func:`atomic_write` of a UTF-8 text (undecodable file-name bytes kept as ``\\xNN``, see :func:`printable`)."""
    return atomic_write(path, lambda f: f.write(printable(content)), text=True)


def atomic_write_bytes(path: str | os.PathLike, content: bytes) -> Path:
    """:func:`atomic_write` of ``content``."""
    return atomic_write(path, lambda f: f.write(content))


def append_line(path: str | os.PathLike, line: str) -> None:
    """Append one line to a log (JSON lines) and ``fsync`` it: a kill leaves at most a torn last line, which the
    readers drop."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(printable(line.rstrip("\n")) + "\n")
        f.flush()
        os.fsync(f.fileno())


def printable(text: str) -> str:
    """``text`` as valid UTF-8 text: file-name bytes that are not UTF-8 (surrogate-escaped by Python) become
    ``\\xNN`` escapes; anything else is returned unchanged (and fast)."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace").encode(
            "utf-8", "backslashreplace").decode("utf-8")


def _plain_paths(obj: Any) -> Any:
    """``obj`` with paths as ``str`` (JSON has no path type)."""
    if isinstance(obj, dict):
        return {k: _plain_paths(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain_paths(v) for v in obj]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return obj


def write_json(path: str | os.PathLike, obj: Any, default: Callable[[Any], Any] | None = None, indent: int = 2
               ) -> Path:
    """Write ``obj`` as JSON atomically (:func:`atomic_write`); ``default`` converts other types (as in
    ``json.dump``).

    The text is ASCII: a file-name byte that is not UTF-8 is written as its ``\\udcNN`` escape, so ``json.load``
    gives back exactly the name the file has (a datalist, a run's ``config.json`` or ``datalist.json`` read back by
    ``--resume`` / ``evaluate`` still finds its files; :func:`printable` ``\\xNN`` text would not).
    """
    def dump(f: IO[str]) -> None:
        json.dump(_plain_paths(obj), f, indent=indent, default=default, ensure_ascii=True)
        f.write("\n")

    return atomic_write(path, dump, text=True)


def _cell(v: Any) -> Any:
    if isinstance(v, float):
        return "" if not math.isfinite(v) else f"{v:.6g}"
    if isinstance(v, str):
        return printable(v)
    if isinstance(v, os.PathLike):
        return printable(os.fspath(v))
    return v


def write_csv(path: str | os.PathLike, header: Sequence[Any], rows: Iterable[Sequence[Any]]) -> Path:
    """Write a CSV file atomically; floats with up to 6 significant digits, NaN / inf empty, any file name
    :func:`printable`. The rows are formatted in memory first, so a failure never leaves half a file."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow([_cell(h) for h in header])
    for row in rows:
        w.writerow([_cell(v) for v in row])
    return atomic_write(path, lambda f: f.write(buf.getvalue()), text=True)
