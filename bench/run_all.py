"""`make bench`: every speed/size benchmark of bench/, then a summary table in README.md.

Each benchmark prints its figures as ratios against a reference measured in the same run (or as
a size/memory figure) and writes bench/results/<name>.json. `--quick` runs the short versions
(under 3 minutes on 2 cores); the full suite stays under 20 minutes. The DAS accuracy benchmark
(many training runs) is separate: `make bench-das`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from common import RESULTS, ROOT, machine_info, replace_readme_section

BENCHES = [
    ("das_forward", "bench_das.py"),
    ("das_step", "bench_das_step.py"),
    ("evaluation", "bench_evaluation.py"),
    ("index", "bench_index.py"),
    ("projection", "bench_projection.py"),
    ("app", "bench_app.py"),
    ("gpu", "bench_gpu.py"),
]


def load(name: str, quick: bool) -> dict | None:
    for candidate in ([f"{name}_quick", f"{name}-quick", name] if quick else [name]):
        p = RESULTS / f"{candidate}.json"
        if p.is_file():
            return json.loads(p.read_text())
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", nargs="*", default=None)
    args = ap.parse_args()
    started = time.time()
    for name, script in BENCHES:
        if args.only and name not in args.only:
            continue
        cmd = [sys.executable, str(ROOT / "bench" / script), *(["--quick"] if args.quick else [])]
        print(f"== {name}: {' '.join(cmd[1:])}", flush=True)
        t = time.time()
        proc = subprocess.run(cmd, cwd=ROOT)
        print(f"== {name}: exit {proc.returncode} in {time.time() - t:.0f} s", flush=True)
    print(f"all benchmarks: {time.time() - started:.0f} s")
    if not args.quick:
        from summarise import speed_table

        replace_readme_section("speed", speed_table(machine_info()))


if __name__ == "__main__":
    main()
