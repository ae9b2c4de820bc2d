"""Start-up cost of the ``usfmae`` command line: wall time and peak memory of ``usfmae --help``, ``--version`` and
a sub-command's ``--help``, each in a fresh Python process (what a user waits for), and whether torch / MONAI were
imported by argument parsing (they must not be: parsing stays light, each command imports its workflow in ``run``).

Usage::

    python benchmarks/bench_startup.py                # 10 runs of each, median and max
    python benchmarks/bench_startup.py --runs 20 --json startup.json

The reference point is a bare ``python -c pass`` measured the same way, and ``python -c "import torch"`` shows what
an eager import would cost. Peak memory is the child's maximum resident set size (``getrusage``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

CASES: dict[str, list[str]] = {
    "python -c pass (reference)": ["-c", "pass"],
    "usfmae --help": ["-m", "usfmae_core.cli", "--help"],
    "usfmae --version": ["-m", "usfmae_core.cli", "--version"],
    "usfmae finetune --help": ["-m", "usfmae_core.cli", "finetune", "--help"],
    "usfmae predict (parse error)": ["-m", "usfmae_core.cli", "predict"],
    "python -c 'import torch' (what an eager import costs)": ["-c", "import torch"],
}

PROBE = ("import sys, runpy\n"
         "sys.argv = ['usfmae', '--help']\n"
         "try:\n"
         "    runpy.run_module('usfmae_core.cli', run_name='__main__')\n"
         "except SystemExit:\n"
         "    pass\n"
         "print('HEAVY', sorted(m for m in ('torch', 'monai', 'numpy', 'SimpleITK') if m in sys.modules))\n")


def _one(args: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB) of one fresh ``python ARGS`` process."""
    t0 = time.perf_counter()
    pid = os.fork() if hasattr(os, "fork") else None
    if pid == 0:  # child: exec the interpreter with stdout/stderr silenced
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        os.execv(sys.executable, [sys.executable, *args])
    if pid is None:  # no fork (Windows): time only
        subprocess.run([sys.executable, *args], capture_output=True)
        return time.perf_counter() - t0, float("nan")
    _, _, usage = os.wait4(pid, 0)
    wall = time.perf_counter() - t0
    rss_kib = usage.ru_maxrss if sys.platform != "darwin" else usage.ru_maxrss / 1024
    return wall, rss_kib / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=10, help="runs per case (default 10)")
    ap.add_argument("--json", help="also write the figures to this JSON file")
    args = ap.parse_args()

    probe = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True)
    heavy = [line for line in probe.stdout.splitlines() if line.startswith("HEAVY")]
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else \
        platform.processor()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"CPU: {cpu}; python {platform.python_version()}; load average {load:.2f}; {args.runs} runs each")
    print(f"modules imported by `usfmae --help`: {heavy[0][6:] if heavy else probe.stderr.strip()[-200:]}")
    rows = []
    for name, argv in CASES.items():
        _one(argv)  # warm the file cache
        runs = [_one(argv) for _ in range(args.runs)]
        walls, rss = [r[0] for r in runs], [r[1] for r in runs]
        row = {"case": name, "median_s": round(statistics.median(walls), 4), "max_s": round(max(walls), 4),
               "peak_rss_mib": round(max(rss), 1)}
        rows.append(row)
        print(f"{name:58s} median {row['median_s']:.3f} s  max {row['max_s']:.3f} s  peak RSS "
              f"{row['peak_rss_mib']:.0f} MiB")
    if args.json:
        Path(args.json).write_text(json.dumps({"cpu": cpu, "load_average": load, "runs": args.runs,
                                               "heavy_modules_on_help": heavy, "cases": rows,
                                               "when": time.strftime("%Y-%m-%d %H:%M")}, indent=2) + "\n")


if __name__ == "__main__":
    main()
