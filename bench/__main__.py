"""``python -m bench GROUP [--size SIZE] [--json PATH]``: depot's performance suite.

GROUP is ``all`` or one of ``machine``, ``cold``, ``hot``, ``metadata``, ``multi``, ``peers``
(several may be given: ``python -m bench cold hot``). Prints a markdown table (figure | target |
measured | ratio | met) and writes one JSON document with every figure, its target, whether it
was met, the machine's limits and the environment. See ``bench/suite.py`` for what each group
measures and ``docs/benchmarks.md`` for how to read it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import suite

from depot.core.types import parse_size


def main(argv: list[str] | None = None) -> int:
    defaults = suite.Settings()
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="depot performance suite: the machine's limits, depot and its peers on the "
        "same files, in one run",
    )
    parser.add_argument("groups", nargs="+", choices=("all", *suite.GROUPS), metavar="GROUP",
                        help=f"all, or any of: {', '.join(suite.GROUPS)}")
    parser.add_argument("--size", default="1GiB",
                        help="model size for the hot, cold and peer reads; the multi-reader model "
                        "is twice this (default 1GiB)")
    parser.add_argument("--json", type=Path, default=Path("bench-results.json"),
                        help="where the JSON document goes (default ./bench-results.json)")
    parser.add_argument("--runs", type=int, default=defaults.runs,
                        help="best of N for throughputs (default %(default)s)")
    parser.add_argument("--random-reads", type=int, default=defaults.random_reads)
    parser.add_argument("--info-calls", type=int, default=defaults.info_calls)
    parser.add_argument("--ls-entries", type=int, default=defaults.ls_entries)
    parser.add_argument("--readers", type=int, default=defaults.readers,
                        help="processes of the multi-reader figure (default %(default)s)")
    parser.add_argument("--multi-rounds", type=int, default=defaults.multi_rounds,
                        help="paired rounds of the multi-reader figure (default %(default)s)")
    parser.add_argument("--first-byte-ms", type=float, default=defaults.first_byte_ms,
                        help="the store's time to first byte (default %(default)s)")
    parser.add_argument("--rate-per-conn", default=defaults.rate_per_conn,
                        help="the store's rate per connection (default %(default)s)")
    parser.add_argument("--page-size", default=defaults.page_size)
    parser.add_argument("--peers", default=",".join(suite.ALL_PEERS),
                        help="peers to measure, comma-separated (default: all)")
    parser.add_argument("--tmp", default=None, help="parent of the run's temp dir")
    args = parser.parse_args(argv)

    groups = list(suite.GROUPS) if "all" in args.groups else [
        g for g in suite.GROUPS if g in args.groups]  # fmt: skip
    chosen = tuple(p for p in args.peers.split(",") if p)
    unknown = [p for p in chosen if p not in suite.ALL_PEERS]
    if unknown:
        parser.error(f"unknown peers {unknown}; known: {', '.join(suite.ALL_PEERS)}")
    settings = suite.Settings(
        size=parse_size(args.size), runs=args.runs, random_reads=args.random_reads,
        info_calls=args.info_calls, ls_entries=args.ls_entries, readers=args.readers,
        multi_rounds=args.multi_rounds,
        first_byte_ms=args.first_byte_ms, rate_per_conn=args.rate_per_conn,
        page_size=args.page_size, peers=chosen, tmp=args.tmp,
    )  # fmt: skip
    return suite.run(groups, settings, args.json.resolve())


if __name__ == "__main__":
    sys.exit(main())
