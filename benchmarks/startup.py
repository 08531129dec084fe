"""Start-up time of the command line and of the package, side by side: what a user waits before anything happens.

Each command runs in a fresh interpreter, in interleaved rounds (so drift hits every command alike); the medians of
wall time and of CPU time (user + system of the child process) are reported, and every command's ratio to a bare
``python -c pass``. The commands: ``peft-locas --help``, ``peft-locas memorize --help``, an input error
(``memorize`` of a missing file), ``import peft_locas``, and for scale ``import peft`` and ``import torch``. None of
the first four may import torch (a test checks that); the issue's target is "well under a second".

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

COMMANDS = {
    "python -c pass": [sys.executable, "-c", "pass"],
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
    "import torch": [sys.executable, "-c", "import torch"],
}


def timed(command: list[str]) -> tuple[float, float]:
    """Wall and CPU seconds (user + system of the child) of one run."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(command, capture_output=True, env=dict(os.environ, PYTHONDONTWRITEBYTECODE="1"), check=False)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(parser)
    parser.add_argument("--repeats", type=int, default=None, help="interleaved rounds (default 7, quick 3)")
    args = parser.parse_args(argv)
    repeats = args.repeats or (3 if args.quick else 7)
    for command in COMMANDS.values():  # warm the file cache: the first run of each reads from disk
        timed(command)
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in COMMANDS}
    for _ in range(repeats):
        for name, command in COMMANDS.items():
            samples[name].append(timed(command))
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
    print(f"load average {os.getloadavg()[0]:.2f}; median of {repeats} interleaved rounds")
    path = write_results("startup", args, {"repeats": repeats, "rows": rows, "load_average": os.getloadavg()})
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
