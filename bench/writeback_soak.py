"""Write-back soak (not in CI): many rounds of concurrent writes, kill -9 of the worker at a
random moment, restart, sync, verify (src/depot/testing/writeback_crash.py).

Run: ``python bench/writeback_soak.py --iterations 500 --seed 1``; exits 1 on the first violation.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from depot.testing.writeback_crash import run


def main() -> None:
    parser = argparse.ArgumentParser(description="write-back kill -9 soak")
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--files", type=int, default=6, help="files written per round")
    parser.add_argument("--max-size-mib", type=float, default=4.0)
    parser.add_argument("--bandwidth", default="3MiB")
    args = parser.parse_args()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        h = run(Path(tmp), args.iterations, seed=args.seed, files_per_round=args.files,
                max_size=int(args.max_size_mib * 1024 * 1024), bandwidth=args.bandwidth)
    print(f"{args.iterations} rounds in {time.perf_counter() - t0:.1f} s: {h.kills} kills, "
          f"{h.acknowledged} acknowledged writes, {h.recovered} recovered after restart, "
          f"{h.observations} under-store observations, {len(h.violations)} violations")
    for v in h.violations[:20]:
        print("VIOLATION:", v)
    sys.exit(1 if h.violations else 0)


if __name__ == "__main__":
    main()
