"""One reader process of the suite's multi-reader figure (started by ``bench/suite.py``).

``python bench/suite_reader.py ENDPOINT PATH SHORT_CIRCUIT(0|1)``: opens the ``depot://``
filesystem, prints ``ready``, waits for a line on stdin, reads PATH to the end in 8 MiB reads,
then prints ``{"bytes": N, "seconds": S}``. The wait lets the parent start every reader at once.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from read_bench import depot_fs, read_loop


def main() -> None:
    endpoint, path, short_circuit = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
    fs = depot_fs(endpoint, short_circuit=short_circuit)
    print("ready", flush=True)
    sys.stdin.readline()
    total, seconds = read_loop(fs, path)
    fs.close()
    print(json.dumps({"bytes": total, "seconds": seconds}), flush=True)


if __name__ == "__main__":
    main()
