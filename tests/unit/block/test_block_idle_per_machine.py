"""The idle path is per machine: two machines in one process each get their own IdleQueue, their
backends are attached to it, and one machine's vCPU hook never runs the other machine's request
(before, one process-wide queue let any halted vCPU take any backend's request)."""

from __future__ import annotations

import threading

from emu.block import api


def _machine(emu_inprocess, tmp_path, name):
    img = tmp_path / f"{name}.img"
    img.write_bytes(bytes(1 << 20))
    return emu_inprocess("-S", "-drive", f"file={img},format=raw,if=ide")


def test_two_machines_in_one_process_keep_their_requests(emu_inprocess, tmp_path, monkeypatch):
    monkeypatch.setattr(api, "IDLE_GRACE", 3600.0)      # no worker takes them meanwhile
    a = _machine(emu_inprocess, tmp_path, "a")
    b = _machine(emu_inprocess, tmp_path, "b")
    [da], [db] = a.machine.block_devices, b.machine.block_devices
    hook_a, hook_b = a.hardware.cpu.idle_hook, b.hardware.cpu.idle_hook
    qa, qb = da.backend.idle_queue, db.backend.idle_queue
    assert qa is not None and qb is not None and qa is not qb
    assert hook_a == qa.run_one and hook_b == qb.run_one

    seen = []
    da.backend.aio_write(4096, b"\xaa" * 512, lambda r: seen.append(("a", r, threading.current_thread())))
    db.backend.aio_write(8192, b"\xbb" * 512, lambda r: seen.append(("b", r, threading.current_thread())))
    assert da.backend.in_flight == 1 and db.backend.in_flight == 1
    assert hook_b() is True                 # B's vCPU runs B's request...
    assert seen == [("b", None, threading.current_thread())]
    assert hook_b() is False                # ...and not A's, which still waits
    assert da.backend.in_flight == 1
    assert hook_a() is True and hook_a() is False
    assert [s[0] for s in seen] == ["b", "a"]
    assert da.backend.in_flight == 0 and db.backend.in_flight == 0
    assert da.backend.read(4096, 512) == b"\xaa" * 512 and db.backend.read(4096, 512) == bytes(512)
    assert db.backend.read(8192, 512) == b"\xbb" * 512 and da.backend.read(8192, 512) == bytes(512)


def test_closing_a_queue_hands_waiting_requests_to_the_workers(tmp_path, monkeypatch):
    from emu.block.node import BlockGraph

    monkeypatch.setattr(api, "IDLE_GRACE", 3600.0)
    img = tmp_path / "c.img"
    img.write_bytes(bytes(1 << 20))
    g = BlockGraph()
    blk = api.BlockBackend(g.open_image(str(img), "raw"), "c")
    q = api.IdleQueue()
    blk.idle_queue = q
    done = threading.Event()
    try:
        blk.aio_write(0, b"\x5c" * 512, lambda r: done.set())
        assert not done.is_set() and blk.in_flight == 1
        q.close()                           # the machine goes away: nobody will run it idle
        assert done.wait(30)
        assert blk.in_flight == 0 and blk.read(0, 512) == b"\x5c" * 512
    finally:
        blk.close()
        g.close_all()


def test_closing_a_machine_ends_its_idle_dispatcher(emu_inprocess, tmp_path):
    """A machine's close stops its idle queue's dispatcher thread (a process that builds many
    machines, as a test run does, kept one parked thread per machine), and a request submitted
    to that queue afterwards still completes, on the workers."""
    m = _machine(emu_inprocess, tmp_path, "gone")
    [d] = m.machine.block_devices
    q = d.backend.idle_queue
    assert q is m.hardware.idle_queue
    first = threading.Event()               # an idle-path request starts the dispatcher; the
    d.backend.aio_write(0, b"\x17" * 512, lambda r: first.set())   # paused vCPU leaves it to
    assert first.wait(30)                   # the workers past the grace
    thread = q._dispatcher.thread
    assert thread.is_alive()
    m.close()
    assert q.closed and not thread.is_alive()

    from emu.block.node import BlockGraph
    img = tmp_path / "late.img"
    img.write_bytes(bytes(1 << 20))
    g = BlockGraph()
    blk = api.BlockBackend(g.open_image(str(img), "raw"), "late")
    blk.idle_queue = q
    done = threading.Event()
    try:
        blk.aio_write(512, b"\x42" * 512, lambda r: done.set())
        assert done.wait(30) and blk.read(512, 512) == b"\x42" * 512
    finally:
        blk.close()
        g.close_all()
