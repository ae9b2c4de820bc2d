"""Child-process entry point of the USFMAE Slicer module: run a plan of steps, one after another.

Usage (the module writes the plan into the job's folder and starts this script with ``PythonSlicer``)::

    PythonSlicer usfmae_job.py JOB/job_plan.json

The plan is ``{"steps": [...]}``; each step is either

* ``{"name": "classify", "argv": ["predict", MODEL, INPUT, "--out", OUT]}``: what would follow ``usfmae`` on a
  command line (the engine's CLI, so a job folder can be re-run in a terminal), or
* ``{"name": "samples", "call": "USFMAELib.samples:write_samples", "kwargs": {...}}``: a function of the engine or
  of the module's Qt-free library, called with JSON keyword arguments; its JSON-able return value is printed as
  ``USFMAE_RESULT {"step": name, "value": ...}`` for the module to read.

Why a script rather than ``python -m usfmae_core.cli``: ``PythonSlicer`` does not have the scripted-modules folder
(where the extension ships ``usfmae_core``) on its path, and a job may need several steps (prepare, then pretrain)
that are cancelled as one. Every ``argv`` step is checked against the engine's parser before the first step runs,
so a plan this engine does not understand fails at once with one line, not after an hour of step 1.

With ``USFMAE_PROGRESS_LINES=1`` (set by the module) the workflows print ``USFMAE_PROGRESS {json}`` lines. SIGTERM
(the module's Cancel) becomes KeyboardInterrupt, so the CLI stops cleanly, keeping finished checkpoints. The exit
code is the first failing step's (2 for a user error, whose one-line message ``usfmae: error: ...`` is in the log).
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import signal
import sys
import time
from pathlib import Path

RESULT_PREFIX = "USFMAE_RESULT "  # USFMAELib.jobs.RESULT_PREFIX


def _paths() -> None:
    """Make ``usfmae_core`` (installed, shipped beside the module, or in the source checkout) and ``USFMAELib``
    (the module's folder) importable."""
    module_dir = Path(__file__).resolve().parent.parent  # <module>/Scripts/..
    roots = [module_dir] + [r for r in (module_dir, module_dir.parent)
                            if (r / "usfmae_core" / "__init__.py").is_file()]
    for root in reversed(roots):
        if str(root) not in sys.path:
            sys.path.insert(0, str(root))


def _on_sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _error(cause: str, fix: str = "") -> int:
    print(f"usfmae: error: {cause}; {fix}" if fix else f"usfmae: error: {cause}", flush=True)
    return 2


def _check_argv_steps(steps: list[dict]) -> int:
    """Parse every CLI step with the engine's parser; 0 when all are understood."""
    if not any("argv" in s for s in steps):
        return 0
    from usfmae_core.cli import build_parser

    parser = build_parser()
    for step in steps:
        if "argv" not in step:
            continue
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                parser.parse_args([str(a) for a in step["argv"]])
        except SystemExit as exc:
            if exc.code in (0, None):
                continue
            lines = [ln for ln in err.getvalue().strip().splitlines() if ln.strip()]
            return _error(f"this engine's 'usfmae {step.get('name', '?')}' refused the job's arguments "
                          f"({lines[-1] if lines else exc.code})",
                          "update the USFMAE extension and its engine together")
    return 0


def _call(step: dict) -> int:
    module_name, _, function_name = str(step["call"]).partition(":")
    function = getattr(importlib.import_module(module_name), function_name)
    value = function(**dict(step.get("kwargs") or {}))
    print(RESULT_PREFIX + json.dumps({"step": step.get("name", function_name), "value": value}, default=str),
          flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if args and args[0] in ("-h", "--help") else 2
    plan_path = Path(args[0])
    try:
        plan = json.loads(plan_path.read_text(encoding="utf-8"))
        steps = list(plan["steps"])
        if not all(isinstance(s, dict) and ("argv" in s or "call" in s) for s in steps):
            raise ValueError("a step has neither 'argv' nor 'call'")
    except (OSError, ValueError, KeyError, TypeError) as err:
        return _error(f"cannot read the job plan {plan_path} ({err})", "start the job again from the module")
    signal.signal(signal.SIGTERM, _on_sigterm)
    os.environ.setdefault("USFMAE_PROGRESS_LINES", "1")
    _paths()
    try:
        from usfmae_core.cli import main as cli_main
        from usfmae_core.errors import UsfmaeError
    except ImportError as err:
        return _error(f"the usfmae engine cannot be imported ({err})",
                      "install the module's Python packages (USF-MAE module > Setup > Install Python packages)")
    code = _check_argv_steps(steps)
    if code:
        return code
    start = time.monotonic()
    for i, step in enumerate(steps, 1):
        name = step.get("name", f"step {i}")
        what = f"usfmae {' '.join(str(a) for a in step['argv'])}" if "argv" in step else f"{step['call']}()"
        print(f"[USF-MAE] step {i}/{len(steps)} ({name}): {what}", flush=True)
        try:
            code = cli_main([str(a) for a in step["argv"]]) if "argv" in step else _call(step)
        except KeyboardInterrupt:
            print("usfmae: interrupted; finished checkpoints and outputs were kept", flush=True)
            return 130
        except UsfmaeError as err:  # a function step's user error: the same one line as the CLI's
            code = _error(err.cause, err.fix)
        except SystemExit as exc:  # argparse errors
            code = exc.code if isinstance(exc.code, int) else 2
        if code:
            print(f"[USF-MAE] step {name} failed with exit code {code}", flush=True)
            return int(code)
    print(f"[USF-MAE] done: {len(steps)} step(s) in {time.monotonic() - start:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
