"""Write a small sample dataset (Parquet, safetensors, JSON) for ``make run``.

The safetensors files are written by hand (8-byte header length, JSON header, raw tensors) so
the sample needs no tensor library; the Parquet files need pyarrow.
"""

from __future__ import annotations

import json
import random
import struct
import sys
from pathlib import Path


def write_safetensors(path: Path, tensors: dict[str, tuple[list[int], bytes]]) -> None:
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, (shape, data) in tensors.items():
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for _, data in tensors.values():
            f.write(data)


def floats(count: int, rng: random.Random) -> bytes:
    return struct.pack(f"<{count}f", *(rng.uniform(-1, 1) for _ in range(count)))


def main(root: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(42)
    (root / "datasets" / "reviews").mkdir(parents=True, exist_ok=True)
    (root / "models" / "tiny-mlp").mkdir(parents=True, exist_ok=True)
    for part in range(3):
        rows = 20_000
        table = pa.table(
            {
                "id": list(range(part * rows, (part + 1) * rows)),
                "rating": [rng.randint(1, 5) for _ in range(rows)],
                "text": [f"review {i} of part {part}" for i in range(rows)],
                "embedding": [[rng.random() for _ in range(8)] for _ in range(rows)],
            }
        )
        pq.write_table(table, root / "datasets" / "reviews" / f"part-{part:05d}.parquet")
    write_safetensors(
        root / "models" / "tiny-mlp" / "model.safetensors",
        {
            "layer1.weight": ([512, 1024], floats(512 * 1024, rng)),
            "layer1.bias": ([512], floats(512, rng)),
            "layer2.weight": ([10, 512], floats(10 * 512, rng)),
        },
    )
    (root / "models" / "tiny-mlp" / "config.json").write_text(
        json.dumps({"architecture": "mlp", "layers": [1024, 512, 10], "dtype": "float32"}, indent=2)
    )
    (root / "README.json").write_text(
        json.dumps(
            {
                "about": "depot sample dataset",
                "files": ["datasets/reviews/*.parquet", "models/tiny-mlp/model.safetensors"],
            },
            indent=2,
        )
    )
    print(f"sample dataset written to {root}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "sample-data"))
