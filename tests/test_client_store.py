"""The client store (client_store.py): what clients keep, in memory up to a budget and in files under the run folder,
saved record by record; a run behaves bit for bit as with everything in memory, and its checkpoint does not grow."""
import errno
import fcntl
import hashlib
import os
import struct
import threading
import time
from unittest.mock import ANY

import pytest
import torch

import client_store
import federation
from client_store import ClientStore, StoreError
from conftest import kept_records, without_seconds
from engines.inprocess import InProcess
from utils import run_files

NUMELS = {"residual": [3, 2], "memory": None}  # a client keeps a residual of two tensors, 5 floats: 20 bytes a record


def residual(value):
    return [torch.full((3,), float(value)), torch.full((2,), -float(value))]


def assert_holds(store, client_id, value):
    assert [t.tolist() for t in store.get("residual", client_id)] == [[value] * 3, [-value] * 2]


def test_what_is_put_is_got_back_whether_held_in_memory_or_read_from_the_file(tmp_path):
    store = ClientStore(str(tmp_path), NUMELS, 40 / 2**20, False)  # a budget of 40 bytes: two records
    for client_id in range(5):
        store.put("residual", client_id, residual(client_id + 0.5))
    assert len(store.cached) == 2 and store.cached_bytes == 40  # clients 3 and 4; 0, 1 and 2 went to the file
    assert os.path.getsize(tmp_path / "clients" / "residuals.bin") == 3 * 20
    for client_id in (0, 4, 2, 1, 3):
        assert_holds(store, client_id, client_id + 0.5)
    assert store.get("residual", 7) is None and store.clients("residual") == set(range(5))
    store.close()


def test_a_save_writes_only_what_changed_and_never_a_slot_the_last_checkpoint_names(tmp_path):
    """A stop after the store's write but before the checkpoint's (kill -9 between them) leaves the last checkpoint's
    records as they were: they resume as saved."""
    store = ClientStore(str(tmp_path), NUMELS, 1, False)
    for client_id in range(3):
        store.put("residual", client_id, residual(client_id))
    first = store.flush()
    store.committed(first)
    path = tmp_path / "clients" / "residuals.bin"
    saved = path.read_bytes()
    assert len(saved) == 3 * 20 and sorted(slot for slot, _ in first["records"]["residual"].values()) == [0, 1, 2]
    store.put("residual", 1, residual(9))  # client 1 trained again
    second = store.flush()  # ... and the checkpoint naming `second` never reached the disk
    after = path.read_bytes()
    assert after[:60] == saved and len(after) == 4 * 20  # a new slot; the saved three untouched
    store.close()
    for table, expected in ((first, [0, 1, 2]), (second, [0, 9, 2])):
        resumed = ClientStore(str(tmp_path), NUMELS, 1, True)
        resumed.restore(table)
        for client_id, value in enumerate(expected):
            assert_holds(resumed, client_id, value)
        resumed.close()


def test_slots_are_reused_so_the_file_holds_at_most_the_clients_and_one_rounds_changes(tmp_path):
    store = ClientStore(str(tmp_path), NUMELS, 0, False)  # nothing held in memory
    for round_index in range(20):
        for client_id in (round_index % 4, (round_index + 1) % 4):
            store.put("residual", client_id, residual(round_index))
        store.committed(store.flush())
    assert os.path.getsize(tmp_path / "clients" / "residuals.bin") <= (4 + 2) * 20
    for client_id, last_round in ((0, 19), (1, 17), (2, 18), (3, 19)):
        assert_holds(store, client_id, last_round)
    store.close()


def test_a_damaged_store_is_refused_on_restore(tmp_path):
    store = ClientStore(str(tmp_path), NUMELS, 1, False)
    store.put("residual", 0, residual(1))
    table = store.flush()
    store.close()
    path = tmp_path / "clients" / "residuals.bin"
    path.write_bytes(path.read_bytes()[:10])  # cut short
    resumed = ClientStore(str(tmp_path), NUMELS, 1, True)
    with pytest.raises(StoreError, match=r"clients/residuals.bin is missing or shorter than checkpoint.pt says "
                                         r"\(client 0\)"):
        resumed.restore(table)
    resumed.close()


def run(make_conf, tmp_path, name, rounds, resume=False, **overrides):
    conf = make_conf(**{"no_models": 8, "k": 3, "global_epochs": rounds, "sparsifier": "topk", "prop": 0.1,
                        "error_feedback": True, **overrides})
    return federation.run(conf, str(tmp_path / name), resume, InProcess)


def test_a_run_with_no_client_state_in_memory_is_the_run_with_all_of_it(make_conf, tmp_path):
    """A budget of 0: every residual and warm start is written at once and read back when its client is sampled
    again; metrics, and every record kept, equal those of the run that holds all of them in memory."""
    for method in ({}, {"sparsifier": "powersgd", "rank": 1}):
        held = run(make_conf, tmp_path, f"held{len(method)}", 6, **method)
        stored = run(make_conf, tmp_path, f"stored{len(method)}", 6, client_state_memory=0, **method)
        assert without_seconds(stored) == without_seconds(held)
        kept, kept_stored = (kept_records(tmp_path / f"{how}{len(method)}") for how in ("held", "stored"))
        assert kept.keys() == kept_stored.keys() == ({"residual", "memory"} if method else {"residual"})
        for name in kept:
            assert kept[name].keys() == kept_stored[name].keys() and len(kept[name]) == 7  # of 8 clients
            assert all(torch.equal(a, b) for c in kept[name] for a, b in zip(kept[name][c], kept_stored[name][c]))


def test_the_checkpoint_does_not_grow_with_the_rounds_and_a_resume_is_exact(make_conf, tmp_path):
    """Each round's save writes the global state and the records of that round's clients: checkpoint.pt stays the
    size it was after round 2 but for the metrics rows, while the residuals it used to hold grew with every client
    that had trained. A run stopped after 3 rounds and resumed with another budget ends as the run of 8 rounds."""
    straight = run(make_conf, tmp_path, "straight", 8)
    sizes = []
    for rounds in range(2, 9):
        run(make_conf, tmp_path, "stepwise", rounds, resume=rounds > 2, client_state_memory=0)
        sizes.append(os.path.getsize(run_files.checkpoint_path(str(tmp_path / "stepwise"))))
    rows_bytes = len(repr(straight[-1]))  # a metrics row, pickled about as long as it prints
    assert max(sizes) - min(sizes) < 6 * 2 * rows_bytes, sizes
    residual_bytes = 4 * sum(t.numel() for t in kept_records(tmp_path / "straight")["residual"][0])
    assert max(sizes) - min(sizes) < residual_bytes  # less than one client's residual more, after 6 more rounds
    assert without_seconds(run_files.read_metrics(str(tmp_path / "stepwise"))) == \
        without_seconds(run_files.read_metrics(str(tmp_path / "straight")))


def test_a_table_naming_a_slot_past_the_file_or_a_file_that_cannot_be_read_is_refused(tmp_path):
    store = ClientStore(str(tmp_path), NUMELS, 1, False)
    store.put("residual", 0, residual(1))
    table = store.flush()
    store.close()
    digest = table["records"]["residual"][0][1]
    for slot in (1, 2**62):  # past the end; an offset no file can have
        resumed = ClientStore(str(tmp_path), NUMELS, 1, True)
        with pytest.raises(StoreError, match="missing or shorter than checkpoint.pt says"):
            resumed.restore({**table, "records": {"residual": {0: (slot, digest)}}})
        resumed.close()
    path = tmp_path / "clients" / "residuals.bin"
    path.unlink()
    os.mkfifo(path)  # opens, but cannot be read at an offset
    resumed = ClientStore(str(tmp_path), NUMELS, 1, True)
    with pytest.raises(StoreError, match="clients/residuals.bin"):
        resumed.restore(table)
    resumed.close()


def test_a_fresh_run_never_writes_through_a_link_left_in_its_folder(tmp_path):
    (tmp_path / "clients").mkdir()
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    (tmp_path / "clients" / "residuals.bin").symlink_to(victim)
    store = ClientStore(str(tmp_path), NUMELS, 0, False)
    store.put("residual", 0, residual(1))
    store.committed(store.flush())
    store.close()
    assert victim.read_bytes() == b"precious" and not (tmp_path / "clients" / "residuals.bin").is_symlink()


LARGE = {"residual": [16384, 10], "memory": None}  # 65,576 bytes a record: past DIRECT_MIN, in slots of 69,632


def large_residual(value):
    return [torch.full((16384,), float(value)), torch.full((10,), -float(value))]


def test_large_records_fill_aligned_slots_and_resume_from_this_layout_or_the_older_one(tmp_path):
    assert 65576 >= client_store.DIRECT_MIN and client_store.ALIGN == 4096
    store = ClientStore(str(tmp_path), LARGE, 0, False)  # every record goes to the file
    for client_id in range(3):
        store.put("residual", client_id, large_residual(client_id + 1))
    table = store.flush()
    store.close()
    data = (tmp_path / "clients" / "residuals.bin").read_bytes()
    assert table["slot_bytes"] == {"residual": 17 * 4096} and len(data) == 3 * 17 * 4096
    for client_id, (slot, digest) in table["records"]["residual"].items():
        record = data[slot * 17 * 4096:][:65576]
        assert record == struct.pack("<16384f10f", *[client_id + 1.0] * 16384, *[-client_id - 1.0] * 10)
        assert digest == hashlib.sha256(record).digest() and set(data[slot * 17 * 4096 + 65576:][:1384]) == {0}
    resumed = ClientStore(str(tmp_path), LARGE, 0, True)
    resumed.restore(table)
    assert [resumed.get("residual", c)[0][0].item() for c in range(3)] == [1, 2, 3]
    resumed.close()

    # a checkpoint written before slots were aligned: no slot_bytes, a record per slot
    older = tmp_path / "older"
    (older / "clients").mkdir(parents=True)
    records = [struct.pack("<16384f10f", *[7.0] * 16384, *[-7.0] * 10), struct.pack("<16384f10f", *[8.0] * 16394)]
    (older / "clients" / "residuals.bin").write_bytes(b"".join(records))
    resumed = ClientStore(str(older), LARGE, 0, True)
    resumed.restore({"numels": LARGE, "records": {"residual": {
        5: (1, hashlib.sha256(records[1]).digest()), 9: (0, hashlib.sha256(records[0]).digest())}}})
    assert resumed.get("residual", 9)[1].tolist() == [-7.0] * 10 and resumed.get("residual", 5)[1][0] == 8
    resumed.put("residual", 5, large_residual(3))  # written in the file's own layout, to a free slot
    resumed.committed(resumed.flush())
    assert len((older / "clients" / "residuals.bin").read_bytes()) == 3 * 65576
    resumed.close()

    for slot_size in (65577, 18 * 4096, 2**40, 17 * 4096.0, "69632"):
        resumed = ClientStore(str(tmp_path), LARGE, 0, True)
        with pytest.raises(ValueError, match=f"gives slots of {slot_size!r} bytes for records of 65576"):
            resumed.restore({**table, "slot_bytes": {"residual": slot_size}})
        resumed.close()
    resumed = ClientStore(str(tmp_path), LARGE, 0, True)
    with pytest.raises(ValueError, match="gives slots of None bytes"):
        resumed.restore({**table, "slot_bytes": [69632]})
    resumed.close()


def test_a_file_system_refusing_o_direct_on_the_file_or_at_a_transfer_gets_buffered_io(tmp_path, monkeypatch):
    """O_DIRECT is set on the open file: asked at the open, Linux makes the file before refusing the flag (ramfs), and
    the fresh run's exclusive open could not make it again."""
    if not hasattr(os, "O_DIRECT"):
        pytest.skip("no O_DIRECT on this platform: the store's files are buffered")
    asked, set_flags = [], fcntl.fcntl

    def refusing_fcntl(descriptor, command, *argument):
        if command == fcntl.F_SETFL and argument[0] & os.O_DIRECT:
            asked.append(descriptor)
            raise OSError(errno.EINVAL, "Invalid argument")
        return set_flags(descriptor, command, *argument)
    monkeypatch.setattr(client_store.fcntl, "fcntl", refusing_fcntl)
    store = ClientStore(str(tmp_path / "at_open"), LARGE, 0, False)
    store.put("residual", 0, large_residual(4))
    table = store.flush()
    assert len(asked) == 1 and not store.direct and store.get("residual", 0)[0][0] == 4
    store.close()
    monkeypatch.setattr(client_store.fcntl, "fcntl", set_flags)
    refused, pwritev = [], os.pwritev

    def refusing_pwritev(descriptor, buffers, offset):
        if fcntl.fcntl(descriptor, fcntl.F_GETFL) & os.O_DIRECT:
            refused.append(offset)
            raise OSError(errno.EINVAL, "Invalid argument")
        return pwritev(descriptor, buffers, offset)
    monkeypatch.setattr(client_store.os, "pwritev", refusing_pwritev)
    store = ClientStore(str(tmp_path / "at_write"), LARGE, 0, False)
    store.put("residual", 0, large_residual(5))
    store.put("residual", 1, large_residual(6))
    second = store.flush()
    assert refused == [0] and not store.direct and [store.get("residual", c)[0][0].item() for c in (0, 1)] == [5, 6]
    store.close()
    assert second["records"] == {"residual": {0: (0, ANY), 1: (1, ANY)}}  # the first write retried, not moved
    for folder, saved in (("at_open", table), ("at_write", second)):
        assert len((tmp_path / folder / "clients" / "residuals.bin").read_bytes()) == \
            len(saved["records"]["residual"]) * 17 * 4096


def test_records_of_other_sizes_or_names_are_refused_and_small_ones_stay_buffered(tmp_path):
    store = ClientStore(str(tmp_path), LARGE, 0, False)
    with pytest.raises(ValueError, match=r"client 3's residual has tensors of \[16384, 9\] entries, this run's "
                                         r"\[16384, 10\]"):
        store.put("residual", 3, [torch.zeros(16384), torch.zeros(9)])  # its slot would hold another client's rest
    store.put("residual", 0, large_residual(1))
    table = store.flush()
    store.close()
    for records in ({"memory": {}}, {"residual": {0: 5}}, {"residual": {0: (0, "digest")}}):
        resumed = ClientStore(str(tmp_path), LARGE, 0, True)
        with pytest.raises(ValueError, match="names records this run's clients do not keep, or records that are not"):
            resumed.restore({**table, "records": records})
        resumed.close()
    small = ClientStore(str(tmp_path / "small"), {"residual": [1024]}, 0, False)  # 4096 bytes: aligned, but small
    small.put("residual", 0, [torch.ones(1024)])
    small.committed(small.flush())
    assert not small.direct and small.slot_bytes == {"residual": 4096} and small.get("residual", 0)[0].sum() == 1024
    small.close()


def test_a_table_naming_a_slot_far_past_its_records_over_a_sparse_file_lists_no_more_free_slots(tmp_path):
    path = tmp_path / "clients" / "residuals.bin"
    path.parent.mkdir()
    far = 10**7  # slot ten million of 20-byte records: a sparse file of 200 MB, zeros, whose digest is the zeros'
    with open(path, "wb") as f:
        f.truncate((far + 1) * 20)
    resumed = ClientStore(str(tmp_path), NUMELS, 1, True)
    resumed.restore({"numels": {"residual": [3, 2]}, "records": {"residual": {0: (far, hashlib.sha256(bytes(20))
                                                                                   .digest())}}})
    assert resumed.free["residual"] == [0, 1] and resumed.get("residual", 0)[0].tolist() == [0.0] * 3
    resumed.put("residual", 1, residual(2))
    resumed.committed(resumed.flush())
    assert resumed.saved["residual"][1][0] == 0  # the lowest free slot
    resumed.close()


def test_a_save_writes_its_records_on_two_threads_to_the_slots_one_thread_would_use(tmp_path, monkeypatch):
    """A save hands its records to WRITERS threads (SHA-256 and the transfers release the GIL), each through its own
    staging buffer; the slots are taken, and the records named in the table, in the records' order, so the file's
    layout and the checkpoint's bytes are the one-thread ones."""
    assert client_store.WRITERS == 2
    threads, pwritev = {}, os.pwritev

    def recording_pwritev(descriptor, buffers, offset):
        threads[offset] = threading.get_ident()
        if offset == 0:
            time.sleep(0.1)  # the first record's writer finishes last
        return pwritev(descriptor, buffers, offset)
    monkeypatch.setattr(client_store.os, "pwritev", recording_pwritev)
    store = ClientStore(str(tmp_path), LARGE, 100, False)  # all held in memory until the save
    for client_id in (6, 2, 9, 4, 0, 7):
        store.put("residual", client_id, large_residual(client_id + 1))
    table = store.flush()
    store.close()
    slot = 17 * 4096
    assert sorted(threads) == [i * slot for i in range(6)] and len(set(threads.values())) == 2
    assert threading.get_ident() not in threads.values()
    data = (tmp_path / "clients" / "residuals.bin").read_bytes()
    for position, client_id in enumerate((0, 2, 4, 6, 7, 9)):  # client order, slot by slot
        record = struct.pack("<16384f10f", *[client_id + 1.0] * 16384, *[-client_id - 1.0] * 10)
        assert data[position * slot:][:65576] == record and set(data[position * slot + 65576:][:1384]) == {0}
        assert table["records"]["residual"][client_id] == (position, hashlib.sha256(record).digest())
    assert list(table["records"]["residual"]) == [0, 2, 4, 6, 7, 9]  # checkpoint.pt's bytes do not depend on threads

    # both writers meet a file system that refuses O_DIRECT at the transfer: each retries buffered, whichever clears
    # the flag first
    if hasattr(os, "O_DIRECT"):
        def refusing_pwritev(descriptor, buffers, offset):
            if fcntl.fcntl(descriptor, fcntl.F_GETFL) & os.O_DIRECT:
                raise OSError(errno.EINVAL, "Invalid argument")
            return pwritev(descriptor, buffers, offset)
        monkeypatch.setattr(client_store.os, "pwritev", refusing_pwritev)
        store = ClientStore(str(tmp_path / "refused"), LARGE, 100, False)
        for client_id in range(8):
            store.put("residual", client_id, large_residual(client_id))
        store.committed(store.flush())
        assert not store.direct and store.cached_bytes == 8 * 65576
        store.cached.clear()  # read back from the file
        assert [store.get("residual", c)[1][0].item() for c in range(8)] == [-c for c in range(8)]
        store.close()
