"""BlockDevice's O_DIRECT metadata path (storage/device.py, _DirectIO)."""

from __future__ import annotations

import os
import threading

import pytest

from clusterfs.storage.device import BlockDevice


def test_closing_waits_for_a_read_under_way_in_another_thread(tmp_path):
    """A read abandoned by a cancelled caller (the disk heartbeat's worker thread at
    unmount) may still hold a view of the bounce buffer when the device is closed:
    close waits for it, where it used to fail the unmount with BufferError (seen once
    in tests/test_cluster_twonode.py and once in tests/test_cluster_netcut.py)."""
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(1 << 20)
    dev = BlockDevice(str(image))
    if not dev.bypass_page_cache():
        dev.close()
        pytest.skip("O_DIRECT refused here")
    direct = dev._direct
    errors: list[BaseException] = []
    closed = threading.Event()

    def close() -> None:
        try:
            dev.close()
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)
        closed.set()

    with direct.lock, memoryview(direct.buf):            # a read under way
        closer = threading.Thread(target=close)
        closer.start()
        assert not closed.wait(0.3)                       # it waits for the read
    closer.join(5)
    assert closed.is_set() and errors == [], errors
    assert dev.fd == -1 and os.path.exists(image)
