"""Direct (short-circuit) reads of a page store's files, for readers outside the worker.

A client on the same node as a worker can read that worker's pages straight from its cache dirs
instead of over HTTP. Everything such a reader needs is here, below the worker in the layering:

- ``host_identity()`` and ``describe()``: what a worker advertises (``GET /api/v1/info``,
  ``local``) so that a client can tell it runs on the same node and where the pages are;
- ``check_local()``: the client's side of that check (same boot id, the dirs visible at the
  same paths, holding the worker's id file and pages of the expected format and page size);
- ``PageFiles.read_into()``: open a page file by its ``PageId`` (the path is derived from the
  id alone: ``<dir>/pages/<shard>/<file dir>/<index>``), check its footer, read the bytes asked
  for straight into the caller's buffer and verify the xxh3 checksum of every 64 KiB block they
  touch before returning (``read_blocks``, the same code the page store reads with). A whole
  page is read with its trailer in one ``preadv`` (no ``fstat``, no second read): the syscalls
  per page were a tenth of a short-circuit read's time.

Why this is safe against the worker's own changes: a page file is written to a temp file and
renamed into place, and never modified afterwards; replacing or evicting it unlinks the name.
An open fd keeps the inode it opened (POSIX), so a reader sees one complete page file or none
(ENOENT), never a mix; a torn or damaged file fails its footer or block checksums. Pages are keyed
by the file's version, so a reader that holds the current version tag cannot find stale bytes.
"""

from __future__ import annotations

import errno
import json
import os
import socket
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import xxhash

from depot.core.types import PageId
from depot.pagestore import format as fmt

BLOCK_SIZE = fmt.BLOCK_SIZE
META_NAME = "depot-pagestore.json"
PAGES_DIR = "pages"
WORKER_ID_FILE = "worker-id"
BOOT_ID_PATH = "/proc/sys/kernel/random/boot_id"
RWF_NOWAIT: int = getattr(os, "RWF_NOWAIT", 0)

_hash = xxhash.xxh3_64_intdigest


class CorruptPage(Exception):
    """A page's bytes, footer or file do not check out; the page must not be served."""


# ------------------------------------------------------------------------- host identity


def host_identity() -> dict[str, str]:
    """This node's identity: the kernel's boot id (shared by every container of the node) and
    the host name (informational: containers of one node have different ones)."""
    try:
        boot_id = Path(BOOT_ID_PATH).read_text().strip()
    except OSError:
        boot_id = ""
    return {"boot_id": boot_id, "hostname": socket.gethostname()}


def describe(dirs: list[Path], page_size: int) -> dict[str, Any]:
    """What a worker advertises so that a local client can read its pages (no secrets)."""
    return {
        **host_identity(),
        "cache_dirs": [str(Path(d).absolute()) for d in dirs],
        "page_size": page_size,
        "page_format": fmt.FORMAT_VERSION,
        "block_size": BLOCK_SIZE,
        "id_file": WORKER_ID_FILE,
    }


@dataclass(frozen=True, slots=True)
class LocalStore:
    """A worker's page store as seen by a reader on the same node."""

    worker_id: str
    dirs: tuple[Path, ...]
    page_size: int

    def files(self) -> PageFiles:
        return PageFiles(self.dirs, self.page_size)


def check_local(info: Any, identity: dict[str, str] | None = None) -> tuple[LocalStore | None, str]:
    """The local store a worker's ``/api/v1/info`` document describes, if this process can
    read it directly: (store, "") or (None, why not)."""
    if not isinstance(info, dict):
        return None, "no info document"
    local = info.get("local")
    worker_id = info.get("worker_id")
    if not isinstance(local, dict) or not isinstance(worker_id, str) or not worker_id:
        return None, "the worker does not advertise its page store"
    me = identity if identity is not None else host_identity()
    boot_id = local.get("boot_id")
    if not me["boot_id"] or not isinstance(boot_id, str) or boot_id != me["boot_id"]:
        return None, "another node (boot id differs)"
    if local.get("page_format") != fmt.FORMAT_VERSION or local.get("block_size") != BLOCK_SIZE:
        return None, "another page file format"
    page_size = local.get("page_size")
    dirs = local.get("cache_dirs")
    if not isinstance(page_size, int) or page_size <= 0 or not isinstance(dirs, list) or not dirs:
        return None, "malformed page store description"
    roots = tuple(Path(d) for d in dirs if isinstance(d, str))
    if len(roots) != len(dirs) or not all(r.is_absolute() for r in roots):
        return None, "malformed cache dirs"
    id_file = local.get("id_file", WORKER_ID_FILE)
    if not isinstance(id_file, str) or "/" in id_file:
        return None, "malformed id file name"
    try:
        found = (roots[0] / id_file).read_text().strip()
    except OSError as exc:
        return None, f"cache dir not visible here ({exc.strerror or exc})"
    if found != worker_id:
        return None, "the cache dir at that path belongs to another worker"
    want = {"format": fmt.FORMAT_VERSION, "page_size": page_size, "block_size": BLOCK_SIZE}
    for root in roots:
        try:
            have = json.loads((root / META_NAME).read_text())
        except (OSError, ValueError):
            return None, f"cache dir {root} not readable here"
        if have != want:
            return None, f"cache dir {root} holds another page format"
        if not os.access(root / PAGES_DIR, os.R_OK | os.X_OK):
            return None, f"no permission to read {root / PAGES_DIR}"
    return LocalStore(worker_id, roots, page_size), ""


# ------------------------------------------------------------------------- reading pages


class PageFiles:
    """Reads pages of one store by their ids, without the store's index (read-only)."""

    def __init__(self, dirs: tuple[Path, ...] | list[Path], page_size: int) -> None:
        self.roots = [str(Path(d) / PAGES_DIR) for d in dirs]
        self.page_size = page_size
        self._tail_max = fmt.trailer_size_for(page_size)
        self._scratch = memoryview(bytearray(2 * BLOCK_SIZE))
        # ``<shard>/<file dir>/`` of recent file keys: a hot file's pages are read one by one.
        self._file_dirs: dict[str, str] = {}

    def open(self, page: PageId) -> int:
        """An fd of ``page``'s file, or -1 if no dir holds it (evicted, or never cached)."""
        key = page.file_key
        where = self._file_dirs.get(key)
        if where is None:
            path = fmt.page_path(page)
            where = f"{path.shard}/{path.file_dir}/"
            if len(self._file_dirs) >= _FILE_DIRS_KEPT:
                self._file_dirs.clear()
            self._file_dirs[key] = where
        name = where + str(page.index)
        for root in self.roots:
            try:
                return os.open(f"{root}/{name}", os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
        return -1

    def read_into(
        self,
        page: PageId,
        length: int,
        offset: int,
        out: memoryview,
        flags: int = 0,
        scratch: memoryview | None = None,
    ) -> bool:
        """Fill ``out`` with bytes ``[offset, offset + len(out))`` of ``page``, verified.

        ``length`` is the page's expected data length (from the file's size): a file that
        says otherwise is not used. Returns False if the page is not there. Raises
        ``CorruptPage`` if it does not check out and ``BlockingIOError`` if ``flags`` has
        ``RWF_NOWAIT`` and the bytes are not all in the page cache. ``out`` may have been
        written to in both cases.
        """
        fd = self.open(page)
        if fd < 0:
            return False
        try:
            # The trailer is where a page of ``length`` bytes has it; a file of another size
            # fails the footer's checks there (its length, tag and checksum), or reads short.
            size = fmt.file_size(length)
            whole = offset == 0 and len(out) == length
            # All of the trailer for a whole page; else up to the largest one, from the end.
            want = size - length if whole else min(size, self._tail_max)
            tail = bytearray(want)
            if whole:
                # The whole page: its data and its trailer in one read, then checked.
                got = os.preadv(fd, [out, tail], 0, flags)
                if got != length + want:
                    if flags and got >= 0:
                        raise BlockingIOError(errno.EAGAIN, "page not cached")
                    raise CorruptPage(f"page file of {got} bytes for a page of {length}")
            else:
                got = os.preadv(fd, [tail], size - want, flags)
                if got != want:
                    if flags and got >= 0:
                        raise BlockingIOError(errno.EAGAIN, "trailer not cached")
                    raise CorruptPage("page file truncated")
            try:
                found, sums = fmt.decode_trailer(page, tail, size)
            except fmt.PageFormatError as exc:
                raise CorruptPage(str(exc)) from None
            if found != length:
                raise CorruptPage("page length differs from the file's")
            if whole:
                verify_blocks(out, sums)
            else:
                read_blocks(fd, length, sums, offset, out, flags, scratch or self._scratch)
        except OSError as exc:
            if isinstance(exc, BlockingIOError) or exc.errno not in _MEDIA_ERRORS:
                raise
            raise CorruptPage(f"read error: {exc}") from None
        finally:
            os.close(fd)
        return True


#: File keys whose page dir ``PageFiles`` remembers (then it starts over).
_FILE_DIRS_KEPT = 1024


def verify_blocks(data: memoryview, sums: array[int]) -> None:
    """Check every block of a whole page's ``data`` against its checksum table."""
    bs = BLOCK_SIZE
    for b in range(len(sums)):
        if _hash(data[b * bs : (b + 1) * bs], b) != sums[b]:
            raise CorruptPage(f"checksum mismatch in block {b}")


_MEDIA_ERRORS = frozenset({errno.EIO, errno.ENODATA, getattr(errno, "EUCLEAN", 117)})


def read_blocks(
    fd: int,
    length: int,
    sums: array[int],
    offset: int,
    out: memoryview,
    flags: int,
    scratch: memoryview,
) -> None:
    """Read the blocks covering ``[offset, offset + len(out))``, verify them, fill ``out``.

    Whole blocks inside the range are read straight into ``out`` and verified there; only a
    partly covered first or last block goes through ``scratch`` (2 blocks long) to be verified
    before its slice is copied out. Raises ``BlockingIOError`` if ``flags`` has RWF_NOWAIT and
    the data is not all cached, ``CorruptPage`` on a checksum mismatch or a short file.
    """
    bs = BLOCK_SIZE
    n = len(out)
    end = offset + n
    first = offset // bs
    last = (end - 1) // bs
    start = first * bs
    stop = min((last + 1) * bs, length)
    iov: list[memoryview] = []
    blocks: list[tuple[int, memoryview]] = []
    copies: list[tuple[memoryview, memoryview]] = []
    if first == last:
        if offset == start and end == stop:
            iov.append(out)
            blocks.append((first, out))
        else:
            buf = scratch[: stop - start]
            iov.append(buf)
            blocks.append((first, buf))
            copies.append((out, buf[offset - start : end - start]))
    else:
        head_end = (first + 1) * bs  # file offset where the first block ends
        if offset == start:
            body_from = offset
        else:
            buf = scratch[:bs]
            iov.append(buf)
            blocks.append((first, buf))
            copies.append((out[: head_end - offset], buf[offset - start :]))
            body_from = head_end
        tail_start = last * bs
        body_to = stop if end == stop else tail_start
        if body_to > body_from:
            body = out[body_from - offset : body_to - offset]
            iov.append(body)
            for b in range(body_from // bs, (body_to - 1) // bs + 1):
                lo = b * bs - body_from
                blocks.append((b, body[lo : lo + bs]))
        if end != stop:
            buf = scratch[bs : bs + stop - tail_start]
            iov.append(buf)
            blocks.append((last, buf))
            copies.append((out[tail_start - offset :], buf[: end - tail_start]))
    got = os.preadv(fd, iov, start, flags)
    if got != stop - start:
        if flags and got >= 0:
            raise BlockingIOError(errno.EAGAIN, "partly cached")
        raise CorruptPage(f"short read: {got} of {stop - start} bytes")
    for b, view in blocks:
        if _hash(view, b) != sums[b]:
            raise CorruptPage(f"checksum mismatch in block {b}")
    for dst, src in copies:
        dst[:] = src




# ------------------------------------------------------------------------- touched pages

MAX_TOUCHED = 1 << 16  # pages one report may name


def encode_touched(pages: dict[str, set[int]]) -> str:
    """Page ids in a compact text form: ``KEY:0-31,40;KEY2:7`` (ranges of indexes per file)."""
    parts: list[str] = []
    for key, indexes in pages.items():
        runs: list[str] = []
        ordered = sorted(indexes)
        i = 0
        while i < len(ordered):
            j = i
            while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
                j += 1
            runs.append(str(ordered[i]) if i == j else f"{ordered[i]}-{ordered[j]}")
            i = j + 1
        if runs:
            parts.append(f"{key}:{','.join(runs)}")
    return ";".join(parts)


def decode_touched(text: str, limit: int = MAX_TOUCHED) -> list[PageId]:
    """The page ids of ``encode_touched``'s text; ValueError if malformed or over ``limit``."""
    out: list[PageId] = []
    for part in text.split(";") if text else ():
        key, sep, runs = part.partition(":")
        if not sep or not key or len(key) > 200:
            raise ValueError(f"malformed page list entry {part[:60]!r}")
        for run in runs.split(","):
            lo, dash, hi = run.partition("-")
            if not lo.isdigit() or (dash and not hi.isdigit()) or len(lo) > 12 or len(hi) > 12:
                raise ValueError(f"malformed page range {run[:30]!r}")
            first, last = int(lo), int(hi) if dash else int(lo)
            if last < first or len(out) + last - first + 1 > limit:
                raise ValueError("page list too long or reversed")
            out.extend(PageId(key, i) for i in range(first, last + 1))
    return out
