"""Child-process entry point of the USFMAE Slicer module: run a plan of ``usfmae`` CLI steps, one after another.

Usage (the module writes the plan into the job's output folder and starts this script with ``PythonSlicer``)::

    PythonSlicer usfmae_job.py OUT/job_plan.json

where the plan is ``{"steps": [{"name": "prepare", "argv": ["prepare", "SRC", "--out", "CORPUS"]},
{"name": "pretrain", "argv": ["pretrain", ...]}]}``: each ``argv`` is what would follow ``usfmae`` on a command line.

Why a script rather than ``python -m usfmae_core.cli``: ``PythonSlicer`` does not have the scripted-modules folder
(where the extension ships ``usfmae_core``) on its path, and pretraining from folders needs two commands (prepare,
then pretrain) that should be cancelled as one job.

With ``USFMAE_PROGRESS_LINES=1`` (set by the module) the workflows print ``USFMAE_PROGRESS {json}`` lines. SIGTERM
(the module's Cancel) becomes KeyboardInterrupt, so the CLI stops cleanly, keeping finished checkpoints. The exit
code is the first failing step's (2 for a user error, whose one-line message is the last line of the log).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path


def _engine_on_path() -> None:
    """Find ``usfmae_core``: installed, shipped beside the module (``<module>/usfmae_core``), or in the source
    checkout (``<repo>/usfmae_core``)."""
    here = Path(__file__).resolve().parent  # <module>/Scripts
    for root in (here.parent, here.parent.parent):
        if (root / "usfmae_core" / "__init__.py").is_file():
            if str(root) not in sys.path:
                sys.path.insert(0, str(root))
            return


def _on_sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if args and args[0] in ("-h", "--help") else 2
    plan_path = Path(args[0])
    try:
        plan = json.loads(plan_path.read_text(encoding="utf-8"))
        steps = plan["steps"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        print(f"usfmae: error: cannot read the job plan {plan_path} ({err}); start the job again from the module",
              flush=True)
        return 2
    signal.signal(signal.SIGTERM, _on_sigterm)
    os.environ.setdefault("USFMAE_PROGRESS_LINES", "1")
    _engine_on_path()
    try:
        from usfmae_core.cli import main as cli_main
    except ImportError as err:
        print(f"usfmae: error: the usfmae engine cannot be imported ({err}); install the module's Python "
              "packages (USF-MAE module > Setup > Install)", flush=True)
        return 2
    start = time.monotonic()
    for i, step in enumerate(steps, 1):
        name, step_argv = step.get("name", f"step {i}"), [str(a) for a in step["argv"]]
        print(f"[USF-MAE] step {i}/{len(steps)} ({name}): usfmae {' '.join(step_argv)}", flush=True)
        try:
            code = cli_main(step_argv)
        except KeyboardInterrupt:
            print("usfmae: interrupted; finished checkpoints and outputs were kept", flush=True)
            return 130
        except SystemExit as exc:  # argparse errors
            code = exc.code if isinstance(exc.code, int) else 2
        if code:
            print(f"[USF-MAE] step {name} failed with exit code {code}", flush=True)
            return int(code)
    print(f"[USF-MAE] done: {len(steps)} step(s) in {time.monotonic() - start:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
