"""``PageFiles.read_into``: the verified reader of page files that hot lanes and short-circuit
clients use, on whole pages (data and trailer in one read) and on parts of pages."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from depot.core.types import PageId
from depot.pagestore import format as fmt
from depot.pagestore.direct import BLOCK_SIZE, PAGES_DIR, CorruptPage, PageFiles
from depot.testing.damage import flip_byte

PAGE_SIZE = 4 * BLOCK_SIZE
KEY = "s3://bucket/data.bin@v1"


def write_page(root: Path, page: PageId, data: bytes, extra: bytes = b"") -> Path:
    where = fmt.page_path(page)
    folder = root / PAGES_DIR / where.shard / where.file_dir
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / where.name
    sums = fmt.block_sums(memoryview(data))
    path.write_bytes(data + fmt.encode_trailer(page, len(data), sums) + extra)
    return path


@pytest.fixture
def store(tmp_path: Path) -> tuple[PageFiles, Path, dict[int, bytes]]:
    pages = {0: os.urandom(PAGE_SIZE), 1: os.urandom(PAGE_SIZE), 2: os.urandom(BLOCK_SIZE + 123)}
    for index, data in pages.items():
        write_page(tmp_path, PageId(KEY, index), data)
    return PageFiles([tmp_path], PAGE_SIZE), tmp_path, pages


def read(files: PageFiles, index: int, length: int, offset: int, count: int) -> bytes:
    out = bytearray(count)
    assert files.read_into(PageId(KEY, index), length, offset, memoryview(out))
    return bytes(out)


@pytest.mark.parametrize("index", [0, 1, 2])
def test_whole_pages_and_parts_read_back(store, index: int) -> None:
    files, _, pages = store
    data = pages[index]
    assert read(files, index, len(data), 0, len(data)) == data  # whole: one read
    for offset, count in [(0, 1), (1, BLOCK_SIZE), (BLOCK_SIZE - 7, 20), (len(data) - 5, 5)]:
        assert read(files, index, len(data), offset, count) == data[offset : offset + count]


def test_a_missing_page_is_not_there(store) -> None:
    files, _, _ = store
    assert not files.read_into(PageId(KEY, 9), PAGE_SIZE, 0, memoryview(bytearray(PAGE_SIZE)))
    assert not files.read_into(PageId("other", 0), PAGE_SIZE, 0, memoryview(bytearray(10)))


@pytest.mark.parametrize(
    "how",
    ["data byte", "checksum table", "footer", "truncated", "other page's file",
     "expected length differs"],
)  # fmt: skip
@pytest.mark.parametrize("whole", [True, False])
def test_a_page_that_does_not_check_out_is_never_read(store, how: str, whole: bool) -> None:
    files, root, pages = store
    page = PageId(KEY, 1)
    data = pages[1]
    path = root / PAGES_DIR / fmt.page_path(page).shard / fmt.page_path(page).file_dir / "1"
    length = len(data)
    size = path.stat().st_size
    if how == "data byte":
        flip_byte(path, 3 * BLOCK_SIZE + 11)
    elif how == "checksum table":
        flip_byte(path, length + 8 * 3 + 2)
    elif how == "footer":
        flip_byte(path, size - 3)
    elif how == "truncated":
        os.truncate(path, size - 1)
    elif how == "other page's file":
        path.write_bytes((path.parent / "0").read_bytes())
    else:
        length -= BLOCK_SIZE  # the caller expects a shorter page than the file holds
    offset, count = (0, length) if whole else (3 * BLOCK_SIZE, 100)
    with pytest.raises(CorruptPage):
        files.read_into(page, length, offset, memoryview(bytearray(count)))
    # Its neighbours are not affected.
    assert read(files, 0, PAGE_SIZE, 0, PAGE_SIZE) == pages[0]


def test_bytes_past_the_trailer_are_not_read(store) -> None:
    """The trailer is read where a page of the expected length has it (no ``fstat``): what
    follows it is never read, and the page's own bytes still check out."""
    files, root, pages = store
    page = PageId(KEY, 1)
    path = root / PAGES_DIR / fmt.page_path(page).shard / fmt.page_path(page).file_dir / "1"
    with open(path, "ab") as f:
        f.write(os.urandom(64))
    assert read(files, 1, PAGE_SIZE, 0, PAGE_SIZE) == pages[1]
    assert read(files, 1, PAGE_SIZE, 5, 10) == pages[1][5:15]
