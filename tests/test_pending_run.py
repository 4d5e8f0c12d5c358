"""storage/pending.py's PendingRun by itself: the queued run of a ProxyDevice's
writes (joining, cutting the tail a newer write rewrites, taking requests off its
front). Through a proxy and its servers: test_blockserver.py."""

from __future__ import annotations

from clusterfs.storage.pending import PendingRun


def _run(*writes: tuple[int, bytes]) -> tuple[PendingRun, int]:
    run, cut = PendingRun(), 0
    for offset, data in writes:
        assert run.joins(offset, len(data))
        cut += run.add(offset, memoryview(data))
    return run, cut


def _bytes(run: PendingRun) -> bytes:
    return b"".join(bytes(p) for p in run.pieces)


def test_a_write_that_continues_the_run_joins_it():
    run, cut = _run((100, b"a" * 10), (110, b"b" * 5))
    assert (run.start, run.end, cut) == (100, 115, 0)
    assert _bytes(run) == b"a" * 10 + b"b" * 5


def test_a_write_that_rewrites_the_runs_tail_cuts_it_off():
    """The kernel-split writer's second request: the block the first ended inside,
    whole again. The first copy is cut, never to be sent."""
    run, cut = _run((0, b"w" * 8192), (4096, b"t" * 4096), (4096, b"T" * 4096))
    assert cut == 8192 and (run.start, run.end) == (0, 8192)
    assert _bytes(run) == b"w" * 4096 + b"T" * 4096
    run.add(2000, memoryview(b"x" * 7000))            # inside a piece, and beyond
    assert _bytes(run) == b"w" * 2000 + b"x" * 7000 and run.end == 9000


def test_a_write_over_the_whole_run_replaces_it():
    run, cut = _run((4096, b"a" * 4096), (8192, b"b" * 4096), (0, b"c" * 16384))
    assert cut == 8192 and (run.start, run.end) == (0, 16384)
    assert _bytes(run) == b"c" * 16384


def test_writes_elsewhere_or_short_of_the_end_do_not_join():
    run, _ = _run((4096, b"a" * 8192))
    assert not run.joins(0, 4096)                     # before it, not reaching it
    assert not run.joins(8192, 100)                   # inside, short of its end
    assert not run.joins(12289, 10)                   # a gap after it
    assert run.joins(12288, 10) and run.joins(0, 12288)
    assert PendingRun().joins(123, 4)                 # an empty run takes anything


def test_requests_are_taken_off_the_front_across_pieces():
    run, _ = _run((0, b"a" * 3), (3, b"b" * 3), (6, b"c" * 3))
    assert run.take(4) == (0, b"aaab")
    assert (run.start, run.length) == (4, 5)
    assert run.take(100) == (4, b"bbccc")
    assert run.length == 0 and not run.overlaps(0, 100)


def test_the_newest_piece_comes_first_with_its_offset():
    run, _ = _run((10, b"ab"), (12, b"cde"))
    assert [(o, bytes(d)) for o, d in run.newest_first()] == [(12, b"cde"), (10, b"ab")]
    assert run.overlaps(14, 1) and not run.overlaps(15, 10) and not run.overlaps(0, 10)
