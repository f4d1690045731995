"""qcow2 metadata modules directly: TableCache write-back order, RefcountManager allocation."""

from __future__ import annotations

from emu.block.node import BlockGraph
from emu.block.qcow2.cache import TableCache
from emu.block.qcow2.create import create_qcow2


def test_cache_flushes_dependency_first_and_writes_back_on_eviction():
    disk: dict[int, bytes] = {}
    log: list[tuple[str, int]] = []

    def mk(name):
        def write(off, data):
            log.append((name, off))
            disk[off] = bytes(data)
        return write

    read = lambda off, n: disk.get(off, bytes(n))  # noqa: E731
    ref = TableCache("ref", read, mk("ref"), 16, 4)
    l2 = TableCache("l2", read, mk("l2"), 16, 2)
    l2.depends_on = ref
    r = ref.get(1000)
    r[0] = 1
    ref.mark_dirty(1000)
    t = l2.get(16)
    t[0] = 2
    l2.mark_dirty(16)
    l2.flush()
    assert log == [("ref", 1000), ("l2", 16)]  # refcounts before the table that needs them
    log.clear()
    for off in (32, 48):  # capacity 2: the dirty table at 32 is written when evicted
        l2.get(off)[0] = 3
        l2.mark_dirty(off)
    l2.get(64)
    assert ("l2", 32) in log and disk[32][0] == 3
    l2.forget(48)
    l2.flush()
    assert 48 not in disk  # forgotten tables are never written


def test_refcount_alloc_free_and_reuse(tmp_path):
    p = str(tmp_path / "r.qcow2")
    create_qcow2(p, 1 << 20, cluster_size=4096)
    g = BlockGraph()
    bs = g.open_image(p)
    refs = bs.impl.refs
    a = refs.alloc(3 * 4096)
    assert a == 4 * 4096  # clusters 0-3 are header, reftable, refblock, L1
    assert [refs.get(c) for c in range(3, 8)] == [1, 1, 1, 1, 0]
    refs.update(a, 4096, -1)
    assert refs.get(4) == 0 and refs.alloc(4096) == a  # freed cluster is reused first
    refs.update(a + 4096, 2 * 4096, 1)
    assert refs.get(5) == 2
    g.close_all()
