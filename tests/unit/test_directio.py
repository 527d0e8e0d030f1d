"""DirectWriter: sequential runs written with O_DIRECT, everything else through the page cache;
the file always ends up holding exactly what was written."""

from __future__ import annotations

import errno
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from depot.core import directio
from depot.core.directio import ALIGN, BUFFER, MIN_RUN, DirectIO


class Target:
    """A file written through a DirectWriter (with the page-cache fallback a caller does)."""

    def __init__(self, path: Path) -> None:
        path.write_bytes(b"")
        self.fd = os.open(path, os.O_RDWR)
        self.path = path
        self.io = DirectIO()
        self.direct = self.io.open(path, self.fd)

    def write(self, data: bytes, offset: int) -> None:
        if self.direct is None or not self.direct.write(data, offset):
            os.pwrite(self.fd, data, offset)

    def content(self) -> bytes:
        if self.direct is not None:
            self.direct.flush()
        return self.path.read_bytes()

    def close(self) -> None:
        if self.direct is not None:
            self.direct.close()
        self.io.close()
        os.close(self.fd)


@pytest.fixture
def target(tmp_path: Path) -> Iterator[Target]:
    t = Target(tmp_path / "f.bin")
    yield t
    t.close()


def test_sequential_pieces_of_any_size_go_direct(target: Target) -> None:
    data = os.urandom(3 * BUFFER + 12345)
    pos = 0
    # The first piece is large and aligned (it starts the run); the rest are of odd sizes, as
    # FUSE sends them when the writer's buffer is not page aligned.
    for size in [MIN_RUN + 7, 1048528, 1, 4095, 2 * BUFFER, len(data)]:
        piece = data[pos : pos + size]
        target.write(piece, pos)
        pos += len(piece)
        if pos >= len(data):
            break
    assert target.content() == data
    if target.direct is not None:  # O_DIRECT works here: all but the tail went direct
        assert target.direct.direct_bytes >= len(data) - ALIGN
        assert target.direct.end == -1


def test_scattered_small_writes_use_the_page_cache(target: Target) -> None:
    direct = target.direct
    if direct is None:
        pytest.skip("no O_DIRECT on this filesystem")
    target.write(b"x" * 100, 5000)  # not where the last write ended, and small
    target.write(b"y" * (MIN_RUN - 1), 100_000)
    assert direct.direct_bytes == 0 and direct.end == -1
    # Going on from the last write, even in small pieces, is a run (its head up to an aligned
    # offset through the page cache).
    assert direct.write(b"z" * 10_000, 100_000 + MIN_RUN - 1)
    assert direct.end == 100_000 + MIN_RUN - 1 + 10_000
    expected = bytearray(100_000 + MIN_RUN - 1 + 10_000)
    expected[5000:5100] = b"x" * 100
    expected[100_000 : 100_000 + MIN_RUN - 1] = b"y" * (MIN_RUN - 1)
    expected[100_000 + MIN_RUN - 1 :] = b"z" * 10_000
    assert target.content() == bytes(expected)


def test_a_write_elsewhere_ends_the_run(target: Target) -> None:
    run = os.urandom(MIN_RUN + 100)
    target.write(run, 0)
    assert target.direct is None or target.direct.end == len(run)
    target.write(b"HOLE", 10)  # not a continuation: the run is written out first
    assert target.direct is None or target.direct.end == -1
    expected = bytearray(run)
    expected[10:14] = b"HOLE"
    assert target.content() == bytes(expected)


def test_einval_turns_direct_writes_off(
    target: Target, monkeypatch: pytest.MonkeyPatch
) -> None:
    if target.direct is None:
        pytest.skip("no O_DIRECT on this filesystem")
    real = os.pwrite
    direct_fd = target.direct._direct

    def refuse(fd: int, data: object, offset: int) -> int:
        if fd == direct_fd:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, data, offset)  # type: ignore[arg-type]

    monkeypatch.setattr(directio.os, "pwrite", refuse)
    data = os.urandom(BUFFER + MIN_RUN)
    target.write(data, 0)
    monkeypatch.undo()
    assert target.content() == data
    assert target.direct.direct_bytes == 0
    assert not target.direct.write(data, 0)  # off for good


def test_device_errors_are_raised(target: Target, monkeypatch: pytest.MonkeyPatch) -> None:
    if target.direct is None:
        pytest.skip("no O_DIRECT on this filesystem")
    direct_fd = target.direct._direct
    real = os.pwrite

    def broken(fd: int, data: object, offset: int) -> int:
        if fd == direct_fd:
            raise OSError(errno.EIO, "Input/output error")
        return real(fd, data, offset)  # type: ignore[arg-type]

    monkeypatch.setattr(directio.os, "pwrite", broken)
    # A full buffer is written behind: its error is raised by the next call (here the flush
    # that comes before an fsync), never lost.
    target.write(os.urandom(BUFFER), 0)
    with pytest.raises(OSError) as info:
        target.direct.flush()
    assert info.value.errno == errno.EIO


def test_open_direct_where_there_is_none(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(directio, "_O_DIRECT", 0)
    path = tmp_path / "g.bin"
    path.write_bytes(b"")
    assert DirectIO().open(path, 0) is None


writes = st.lists(
    st.tuples(
        st.integers(0, 3 * BUFFER),
        st.sampled_from([1, 100, ALIGN, MIN_RUN, MIN_RUN + 1, 1048528, BUFFER + 3]),
        st.booleans(),  # go on from the last write's end
    ),
    min_size=1,
    max_size=8,
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(plan=writes)
def test_any_write_sequence_leaves_exactly_the_written_bytes(
    tmp_path: Path, plan: list[tuple[int, int, bool]]
) -> None:
    path = tmp_path / "h.bin"
    target = Target(path)
    model = bytearray()
    end = 0
    try:
        for i, (offset, size, go_on) in enumerate(plan):
            at = end if go_on else offset - offset % (ALIGN if i % 2 else 1)
            data = bytes([i + 1]) * size
            target.write(data, at)
            if len(model) < at + size:
                model.extend(b"\0" * (at + size - len(model)))
            model[at : at + size] = data
            end = at + size
        assert target.content() == bytes(model)
    finally:
        target.close()



def test_writes_go_on_after_the_threads_stopped(target: Target) -> None:
    """A writer still open when its client closes (the DirectIO's threads are gone) writes
    its buffers inline."""
    target.io.close()
    data = os.urandom(2 * BUFFER + 5)
    target.write(data, 0)
    assert target.content() == data


def test_a_forked_child_gets_threads_of_its_own(tmp_path: Path) -> None:
    io = DirectIO()
    io.submit(lambda: None).result()  # the parent's threads exist now
    path = tmp_path / "child.bin"
    pid = os.fork()
    if pid == 0:  # the child: a write behind must not wait on the parent's (absent) threads
        code = 1
        try:
            path.write_bytes(b"")
            fd = os.open(path, os.O_RDWR)
            writer = io.open(path, fd)
            data = b"c" * (BUFFER + 1)
            if writer is None or not writer.write(data, 0):
                os.pwrite(fd, data, 0)
            if writer is not None:
                writer.flush()
            code = 0 if path.read_bytes() == data else 2
        finally:
            os._exit(code)
    deadline = time.monotonic() + 30
    done, status = os.waitpid(pid, os.WNOHANG)
    while not done and time.monotonic() < deadline:
        time.sleep(0.05)
        done, status = os.waitpid(pid, os.WNOHANG)
    if not done:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    io.close()
    assert done, "the child's write hung"
    assert os.waitstatus_to_exitcode(status) == 0


def test_takes_direct_io_probes_and_cleans_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    directio.takes_direct_io(tmp_path)
    assert list(tmp_path.iterdir()) == []  # the probe is gone, whatever the answer
    assert directio.takes_direct_io(tmp_path / "missing") is False
    real_open = os.open

    def refusing_open(path: str, flags: int, *args: int) -> int:
        if flags & getattr(os, "O_DIRECT", 0):
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", refusing_open)
    assert directio.takes_direct_io(tmp_path) is False
    assert list(tmp_path.iterdir()) == []
