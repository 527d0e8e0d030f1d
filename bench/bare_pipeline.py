"""The multi-reader figure's bare bound: one fetch and N readers with nothing of depot in them.

Started by ``bench/suite.py`` as separate processes, as depot's readers are:

``python bench/bare_pipeline.py fetch ENDPOINT KEY SIZE DIR`` fetches the object in 4 MiB
ranges, 32 in flight (obstore, as depot's worker does), and writes each range to a new file in
DIR (a temporary name, then a rename: a reader never sees half a page).

``python bench/bare_pipeline.py read DIR SIZE`` reads those files in order as they appear, two
pages (8 MiB) at a time into a new buffer, and hashes each 64 KiB block with xxh3: what checking
a page costs (there is no stored sum here to compare the hash with).

Both print ``ready``, wait for a line on stdin, do their work, then print a JSON line
(``seconds``, ``cpu_s``; the reader also ``bytes``). The pair is what any cache of this shape
must do at least on the node: fetch into files that readers on the node share, and check what
it hands out. depot adds its protocol, its page trailers and its bookkeeping on top.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import sys
import time

PAGE = 4 * 1024 * 1024
BLOCK = 64 * 1024
IN_FLIGHT = 32
#: How long a reader waits before looking again for a page that is not there yet.
POLL = 0.002


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _wait_for_go() -> tuple[float, float]:
    print("ready", flush=True)
    sys.stdin.readline()
    return time.perf_counter(), _cpu()


def _page_path(folder: str, index: int) -> str:
    return os.path.join(folder, f"p{index}")


def fetch(endpoint: str, key: str, size: int, folder: str) -> None:
    import obstore
    from obstore.store import S3Store

    store = S3Store("bucket", endpoint=endpoint, skip_signature=True, region="us-east-1",
                    client_options={"allow_http": True}, virtual_hosted_style_request=False)  # fmt: skip

    def write(index: int, data: memoryview) -> None:
        temp = os.path.join(folder, f".p{index}.tmp")
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        os.rename(temp, _page_path(folder, index))

    async def run() -> None:
        slots = asyncio.Semaphore(IN_FLIGHT)
        loop = asyncio.get_running_loop()

        async def one(index: int) -> None:
            start = index * PAGE
            async with slots:
                data = await obstore.get_range_async(
                    store, key, start=start, length=min(PAGE, size - start)
                )
            await loop.run_in_executor(None, write, index, memoryview(data))

        await asyncio.gather(*(one(i) for i in range(-(-size // PAGE))))

    t0, cpu0 = _wait_for_go()
    asyncio.run(run())
    print(json.dumps({"seconds": time.perf_counter() - t0, "cpu_s": _cpu() - cpu0}), flush=True)


def read(folder: str, size: int) -> None:
    import xxhash

    check = xxhash.xxh3_64_intdigest
    pages = -(-size // PAGE)
    t0, cpu0 = _wait_for_go()
    total = 0
    for first in range(0, pages, 2):
        end = min(size, (first + 2) * PAGE)
        result = bytearray(end - first * PAGE)  # a new buffer per read, as read() returns
        view = memoryview(result)
        for index in range(first, min(first + 2, pages)):
            while True:
                try:
                    fd = os.open(_page_path(folder, index), os.O_RDONLY)
                    break
                except FileNotFoundError:
                    time.sleep(POLL)
            offset = (index - first) * PAGE
            length = min(PAGE, size - index * PAGE)
            try:
                got = os.preadv(fd, [view[offset : offset + length]], 0)
            finally:
                os.close(fd)
            if got != length:
                raise RuntimeError(f"page {index}: {got} of {length} bytes")
            for at in range(offset, offset + length, BLOCK):
                check(view[at : at + BLOCK], 0)
        total += len(view)
        view.release()
    print(json.dumps({"bytes": total, "seconds": time.perf_counter() - t0,
                      "cpu_s": _cpu() - cpu0}), flush=True)  # fmt: skip


def main(argv: list[str]) -> None:
    if len(argv) == 5 and argv[0] == "fetch":
        fetch(argv[1], argv[2], int(argv[3]), argv[4])
    elif len(argv) == 3 and argv[0] == "read":
        read(argv[1], int(argv[2]))
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
