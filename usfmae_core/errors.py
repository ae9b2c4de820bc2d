"""User-facing errors: one line that names the cause and the fix.

:class:`UsfmaeError` is what the engine raises for bad input. :func:`user_error_message` finds the one line to show
for any exception a run can end with: a ``UsfmaeError`` (also when MONAI or a DataLoader worker wrapped it), an
operating-system error (unwritable or full output folder, a file where a folder is expected, ...), running out of
memory. The CLI (``usfmae_core.cli``) and the MONAI bundle (``usfmae_core.bundle_support.one_line_errors``) both print
it as ``usfmae: error: <cause>; <fix>`` and exit with code 2. Light by design: no torch, no MONAI.
"""

from __future__ import annotations

import errno
import re

__all__ = ["UsfmaeError", "find_user_error", "os_error_message", "user_error_message"]


class UsfmaeError(Exception):
    """An error caused by the user's input, shown as ``usfmae: error: <cause>; <fix>`` (exit code 2).

    Args:
        cause: what went wrong, naming the file or value involved.
        fix: what the user can do about it.
    """

    exit_code = 2

    def __init__(self, cause: str, fix: str = "") -> None:
        self.cause = cause
        self.fix = fix
        super().__init__(f"{cause}; {fix}" if fix else cause)


# What the user can do about an operating-system error, by errno.
_OS_FIXES: dict[int, str] = {
    errno.ENOSPC: "free disk space or choose an output folder on another disk",
    errno.EDQUOT: "free disk space (quota exceeded) or choose an output folder on another disk",
    errno.EFBIG: "the file is larger than the file-size limit (ulimit -f) or the file system allows: raise the limit "
                 "or choose another disk",
    errno.EACCES: "check the permissions, or choose a folder you can write to",
    errno.EPERM: "check the permissions, or choose a folder you can write to",
    errno.EROFS: "the file system is read-only: choose an output folder on a writable disk",
    errno.EEXIST: "a file of that name is in the way: remove or rename it, or choose another path",
    errno.ENOTDIR: "a file stands where a folder is expected: remove or rename it, or choose another path",
    errno.EISDIR: "a folder stands where a file is expected: choose a file path",
    errno.ENOENT: "check the path",
    errno.ENAMETOOLONG: "choose a shorter path",
    errno.ELOOP: "the path has a symbolic-link loop: fix or remove the link",
    errno.EMFILE: "too many open files: raise the limit (ulimit -n) or use fewer --workers",
    errno.EIO: "the disk reported an input/output error: check it, or choose another disk",
}


def os_error_message(err: OSError) -> str:
    """``<cause>; <fix>`` for an operating-system error, naming the file involved."""
    from usfmae_core.fileio import printable

    where = printable(str(err.filename)) if err.filename is not None else ""
    if err.filename2 is not None:
        where = f"{where} -> {printable(str(err.filename2))}"
    reason = err.strerror or str(err) or type(err).__name__
    fix = _OS_FIXES.get(err.errno or -1, "check the path, the permissions and the free disk space")
    return f"cannot access {where} ({reason}); {fix}" if where else f"{reason}; {fix}"


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and the exceptions it was raised from / during (``__cause__``, ``__context__``), outermost first."""
    seen: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and all(cur is not s for s in seen) and len(seen) < 50:
        seen.append(cur)
        cur = cur.__cause__ if cur.__cause__ is not None else cur.__context__
    return seen


# A DataLoader worker re-raises a copy of the exception with the worker's traceback as its text; its last line names
# the original exception ("usfmae_core.errors.UsfmaeError: <cause>; <fix>")
_WORKER_LINE = re.compile(r"^(?:usfmae_core\.errors\.)?UsfmaeError: (.+)$", re.MULTILINE)


def find_user_error(exc: BaseException) -> UsfmaeError | None:
    """The :class:`UsfmaeError` that ``exc`` is or was raised from (MONAI wraps errors of config expressions and
    transforms in ``RuntimeError``; DataLoader workers re-raise them as text), else None."""
    for e in _chain(exc):
        if isinstance(e, UsfmaeError):
            text = str(e)
            if "\n" in text:  # re-raised from a DataLoader worker: the traceback text ends with the real message
                found = _WORKER_LINE.findall(text)
                return UsfmaeError(found[-1].strip()) if found else UsfmaeError(text.strip().splitlines()[-1])
            return e
        found = _WORKER_LINE.findall(str(e)) if isinstance(e, RuntimeError) else []
        if found:
            return UsfmaeError(found[-1].strip())
    return None


def user_error_message(exc: BaseException) -> str | None:
    """The one-line ``<cause>; <fix>`` for an exception caused by the input or the machine, or None for a bug.

    Looks through the whole chain of ``exc`` (see :func:`find_user_error`): a :class:`UsfmaeError`, an ``OSError``
    (:func:`os_error_message`), ``MemoryError`` and CUDA / MPS out-of-memory errors.
    """
    user = find_user_error(exc)
    if user is not None:
        from usfmae_core.fileio import printable

        return printable(str(user))
    chain = _chain(exc)
    for e in chain:
        if isinstance(e, MemoryError):
            return "out of memory; use a smaller --batch-size or a smaller model preset"
        if isinstance(e, RuntimeError) and "out of memory" in str(e).lower():
            return ("the GPU ran out of memory; use a smaller --batch-size, --precision bf16 or gradient "
                    "accumulation (--accum-steps)")
    for e in chain:
        if isinstance(e, OSError) and not isinstance(e, (ConnectionError, TimeoutError)):
            return os_error_message(e)
    for e in chain:  # torch.save to a path (e.g. in a MONAI handler) reports a failed write without errno or file
        if isinstance(e, RuntimeError) and any(w in str(e) for w in _TORCH_WRITE_FAILURE):
            return (f"a checkpoint could not be written (PyTorch: {str(e).strip().splitlines()[-1][:100]}); free "
                    "disk space or choose an output folder on another disk, and check its permissions")
    return None


_TORCH_WRITE_FAILURE = ("PytorchStreamWriter failed", "file write failed", "unexpected pos", "iostream error")
