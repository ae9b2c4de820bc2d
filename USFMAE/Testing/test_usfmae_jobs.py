"""Long jobs in a child process (USFMAELib.jobs): real child Python processes, no Qt, no Slicer needed.

The progress protocol is the engine's own (``usfmae_core.workflows.common.Progress`` in the child); cancel must
take down the child and the grandchild it started (as PythonSlicer -> python -> data-loader workers would be).
"""

from __future__ import annotations

import json
import os
import sys
import textwrap
import time
from pathlib import Path

import pytest
from USFMAELib.jobs import Job, format_seconds

SCRIPT = Path(__file__).resolve().parents[1] / "Scripts" / "usfmae_job.py"


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie waiting for a parent that never reaps it counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True  # no /proc (macOS): trust kill(0)


def _wait_for(job: Job, predicate, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        job.poll()
        if predicate():
            return
        if not job.running:
            break
        time.sleep(0.05)
    raise AssertionError(f"condition not met; returncode={job.returncode}, log tail={list(job.log)[-5:]}")


def test_progress_lines_are_parsed_and_log_kept(tmp_path):
    child = textwrap.dedent("""
        import os, sys
        from usfmae_core.workflows.common import Progress, progress_lines_enabled
        assert progress_lines_enabled(), "the job runner must set USFMAE_PROGRESS_LINES=1"
        print("loading 12 frames", flush=True)
        with Progress(total=5, stage="finetune") as bar:
            for step in range(5):
                bar.update(1, loss=1.0 / (step + 1))
        print("wrote model.pt", flush=True)
        sys.exit(3)
    """)
    seen: list[str] = []
    job = Job([sys.executable, "-c", child], name="finetune", on_line=seen.append).start()
    assert job.running and job.poll() is not None  # poll never blocks
    assert job.wait(timeout=120) == 3
    assert list(job.log) == ["loading 12 frames", "wrote model.pt"] == seen  # progress lines are not log lines
    p = job.progress
    assert p["stage"] == "finetune" and p["step"] == p["total"] == 5 and p["loss"] == pytest.approx(0.2)
    assert job.fraction == 1.0 and job.eta_s == 0.0
    assert "failed (exit code 3)" in job.status_text() and not job.cancelled


def test_status_text_while_running():
    job = Job([sys.executable, "-c", ("print('USFMAE_PROGRESS ' + '{\"stage\": \"pretrain\", \"step\": 3, "
                                      "\"total\": 12, \"eta_s\": 95.0, \"loss\": 0.41}', flush=True); import time; "
                                      "time.sleep(30)")]).start()
    try:
        _wait_for(job, lambda: job.progress is not None)
        assert job.fraction == pytest.approx(0.25)
        assert job.status_text() == "pretrain: 3/12, 1 min 35 s left (loss 0.41)"
    finally:
        job.cancel(timeout=2)
    assert format_seconds(3700) == "1 h 01 min" and format_seconds(5) == "5 s"


@pytest.mark.skipif(os.name != "posix", reason="process-group kill is checked on POSIX here")
def test_cancel_stops_child_and_grandchild(tmp_path):
    child = textwrap.dedent("""
        import json, os, subprocess, sys, time
        grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        print(f"PIDS {os.getpid()} {grandchild.pid}", flush=True)
        for step in range(600):
            print("USFMAE_PROGRESS " + json.dumps({"stage": "pretrain", "step": step, "total": 600}), flush=True)
            time.sleep(1)
    """)
    job = Job([sys.executable, "-c", child], name="pretrain").start()
    _wait_for(job, lambda: any(line.startswith("PIDS") for line in job.log) and job.progress is not None)
    pids = [int(p) for p in next(line for line in job.log if line.startswith("PIDS")).split()[1:]]
    assert all(_alive(p) for p in pids)

    start = time.monotonic()
    code = job.cancel(timeout=3.0)
    took = time.monotonic() - start

    assert took < 6.0, f"cancel took {took:.1f} s"
    end = time.monotonic() + 3.0
    while any(_alive(p) for p in pids) and time.monotonic() < end:
        time.sleep(0.05)
    assert not any(_alive(p) for p in pids), "child or grandchild survived cancel"
    assert code is not None and code != 0 and job.cancelled and not job.running
    assert "cancelled" in job.status_text()


@pytest.mark.skipif(os.name != "posix", reason="signals are POSIX")
def test_cancel_kills_a_child_that_ignores_terminate():
    child = ("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); "
             "time.sleep(600)")
    job = Job([sys.executable, "-c", child]).start()
    _wait_for(job, lambda: "ready" in job.log)
    start = time.monotonic()
    job.request_cancel(timeout=1.0)  # non-blocking, as the GUI's Cancel button does
    assert time.monotonic() - start < 0.5 and job.running
    _wait_for(job, lambda: not job.running, timeout=10)
    assert job.returncode == -9 and 0.9 < time.monotonic() - start < 6.0


def test_job_script_runs_cli_steps_in_order_and_stops_at_a_user_error(tmp_path):
    """Scripts/usfmae_job.py with the real engine: a step that works, then one that fails with a one-line error."""
    missing = tmp_path / "missing.pth"
    plan = {"steps": [{"name": "info", "argv": ["info", "--json", "--device", "cpu"]},
                      {"name": "import", "argv": ["import-weights", str(missing), "--out", str(tmp_path / "m.pt")]},
                      {"name": "never", "argv": ["info"]}]}
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    job = Job([sys.executable, str(SCRIPT), str(tmp_path / "plan.json")], cwd=tmp_path).start()
    assert job.wait(timeout=180) == 2
    log = list(job.log)
    assert any("step 1/3 (info)" in line for line in log) and any('"model_cache"' in line for line in log)
    assert not any("step 3/3" in line for line in log)
    errors = [line for line in log if line.startswith("usfmae: error:")]
    assert len(errors) == 1 and str(missing) in errors[0] and "does not exist" in errors[0]


def test_job_script_refuses_a_bad_plan(tmp_path):
    bad = tmp_path / "plan.json"
    bad.write_text("{not json")
    job = Job([sys.executable, str(SCRIPT), str(bad)]).start()
    assert job.wait(timeout=60) == 2
    assert any("cannot read the job plan" in line for line in job.log)


def test_function_steps_return_values_and_one_line_errors(tmp_path):
    """A ``call`` step's value comes back as a result; a user error in it is the engine's one line."""
    plan = {"steps": [{"name": "numbers", "call": "json:loads", "kwargs": {"s": "[1, 2, 3]"}},
                      {"name": "model", "call": "USFMAELib.models:model_info",
                       "kwargs": {"path": str(tmp_path / "missing.pt")}}]}
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    job = Job([sys.executable, str(SCRIPT), str(tmp_path / "plan.json")], cwd=tmp_path).start()
    assert job.wait(timeout=180) == 2
    assert job.results == {"numbers": [1, 2, 3]}  # parsed from the result line, not kept as a log line
    assert not any(line.startswith("USFMAE_RESULT") for line in job.log)
    assert "missing.pt" in job.error() and "\n" not in job.error()


def test_the_progress_protocol_is_the_engines():
    """The module parses progress lines itself (the engine's parser lives in a module that imports torch, which the
    Slicer process must not load): same prefix, same records."""
    from USFMAELib import jobs

    from usfmae_core.workflows import common

    assert jobs.PROGRESS_PREFIX == common.PROGRESS_PREFIX
    for line in ['USFMAE_PROGRESS {"stage": "pretrain", "step": 3, "total": 12, "loss": 0.5}',
                 "USFMAE_PROGRESS not json", "an ordinary line", 'USFMAE_PROGRESS {"step": 1}  ']:
        assert jobs._parse_progress(line) == common.parse_progress_line(line), line
