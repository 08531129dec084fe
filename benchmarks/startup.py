"""Start-up time of the command line and of the package, side by side: what a user waits before anything happens.

Each command runs in a fresh interpreter, in interleaved rounds (so drift hits every command alike); the medians of
wall time and of CPU time (user + system of the child process) are reported, and every command's ratio to a bare
``python -c pass``. The commands: ``peft-locas --help``, ``peft-locas memorize --help``, an input error
(``memorize`` of a missing file), ``import peft_locas``, and for scale ``import peft`` and ``import torch``. None of
the first four may import torch (a test checks that); the issue's target is "well under a second".

The autoload hook (``peft_locas_autoload.pth``, installed with the package) has its own table: interpreter start-up
(``python -c pass``) and ``import peft`` with the hook and with it turned off (``PEFT_LOCAS_NO_AUTOLOAD=1``), medians
of wall and CPU time and their ratios. At start-up the hook only inserts a stub finder, so the ratio should be 1
within noise; on ``import peft`` it registers LOCAS, which imports this package's tuner modules.

    python benchmarks/startup.py [--quick] [--repeats 7]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time

from common import add_common_arguments, print_table, write_results

NO_AUTOLOAD = "PEFT_LOCAS_NO_AUTOLOAD"
OFF = " (autoload off)"  # suffix of the commands run with NO_AUTOLOAD=1
COMMANDS = {
    "python -c pass": [sys.executable, "-c", "pass"],
    "python -c pass" + OFF: [sys.executable, "-c", "pass"],
    "peft-locas --help": [sys.executable, "-m", "peft_locas", "--help"],
    "peft-locas memorize --help": [sys.executable, "-m", "peft_locas", "memorize", "--help"],
    "peft-locas memorize (missing file)": [
        sys.executable,
        "-m",
        "peft_locas",
        "memorize",
        "--text",
        "no-such-file.txt",
        "--out",
        "unused",
    ],
    "import peft_locas": [sys.executable, "-c", "import peft_locas"],
    "import peft": [sys.executable, "-c", "import peft"],
    "import peft" + OFF: [sys.executable, "-c", "import peft"],
    "import torch": [sys.executable, "-c", "import torch"],
}


def timed(name: str) -> tuple[float, float]:
    """Wall and CPU seconds (user + system of the child) of one run of the command ``name``."""
    env = {key: value for key, value in os.environ.items() if key != NO_AUTOLOAD}
    env.update({"PYTHONDONTWRITEBYTECODE": "1", **({NO_AUTOLOAD: "1"} if name.endswith(OFF) else {})})
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(COMMANDS[name], capture_output=True, env=env, check=False)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(parser)
    parser.add_argument("--repeats", type=int, default=None, help="interleaved rounds (default 7, quick 3)")
    args = parser.parse_args(argv)
    repeats = args.repeats or (3 if args.quick else 7)
    for name in COMMANDS:  # warm the file cache: the first run of each reads from disk
        timed(name)
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in COMMANDS}
    for _ in range(repeats):
        for name in COMMANDS:
            samples[name].append(timed(name))
    bare = statistics.median(wall for wall, _ in samples["python -c pass"])
    rows = []
    for name, runs in samples.items():
        wall = statistics.median(w for w, _ in runs)
        rows.append(
            {
                "command": name,
                "wall_s": wall,
                "cpu_s": statistics.median(c for _, c in runs),
                "spread_s": max(w for w, _ in runs) - min(w for w, _ in runs),
                "vs_bare_python": wall / bare,
            }
        )
    print_table(rows, ["command", "wall_s", "cpu_s", "spread_s", "vs_bare_python"])
    autoload = autoload_rows({row["command"]: row for row in rows})
    print(f"\nthe autoload hook (on) against {NO_AUTOLOAD}=1 (off):")
    print_table(autoload, ["command", "wall_on_s", "wall_off_s", "wall_ratio", "cpu_on_s", "cpu_off_s", "cpu_ratio"])
    print(f"load average {os.getloadavg()[0]:.2f}; median of {repeats} interleaved rounds")
    results = {"repeats": repeats, "rows": rows, "autoload": autoload, "load_average": os.getloadavg()}
    path = write_results("startup", args, results)
    print(f"results: {path}")
    return 0


def autoload_rows(rows: dict[str, dict]) -> list[dict]:
    """For each command measured both ways: medians with the hook and without it, and their ratios (on / off)."""
    paired = [name for name in rows if name + OFF in rows]
    return [
        {
            "command": name,
            "wall_on_s": rows[name]["wall_s"],
            "wall_off_s": rows[name + OFF]["wall_s"],
            "wall_ratio": rows[name]["wall_s"] / rows[name + OFF]["wall_s"],
            "cpu_on_s": rows[name]["cpu_s"],
            "cpu_off_s": rows[name + OFF]["cpu_s"],
            "cpu_ratio": rows[name]["cpu_s"] / rows[name + OFF]["cpu_s"],
        }
        for name in paired
    ]


if __name__ == "__main__":
    sys.exit(main())
