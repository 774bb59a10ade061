"""What clients keep from one round to the next (client.KEPT: the error-feedback residual, the sparsifier's memory),
for thousands of clients: the most recently sampled in memory, up to `client_state_memory` MB, and every one in a file
of the run folder (clients/residuals.bin, clients/memories.bin), which the checkpoint names record by record.

    store.get("residual", client_id) -> flat f32 tensors on the CPU, or None
    store.put("residual", client_id, tensors)
    table = store.flush()   # at each save: what changed since the last one, written to free slots and synced to disk
    store.committed(table)  # once the checkpoint holding `table` (per client: its slot and its record's SHA-256) is
                            # on disk, the slots it no longer names are free
    store.restore(table)    # on resume: every record checked against its digest, size and finiteness

Why files of fixed-size slots, read and written whole with pread and pwrite, rather than memory-mapped arrays or a
database: a record is always one client's tensors of one kind, of one size; a slot the last checkpoint names is never
written (a changed record goes to a free slot), so a stop at any moment leaves that checkpoint's records as they were,
with no journal; and a page read through a file sits in the kernel's cache, not in this process's resident memory,
where a memory-mapped store's touched pages count and the budget would bound nothing. A save writes the records of the
clients that trained since the last one, not every client's.

A record of DIRECT_MIN bytes or more fills a slot rounded up to ALIGN bytes and is written and read with O_DIRECT,
past the kernel's page cache: a record read back is a client's beyond the budget, read once when it is sampled, so
caching the file is of no use, and the pages a buffered write needs cost more than the write (on this project's
virtual machines, whose host takes back the memory the kernel frees, a round's 100 records of the CNN took 0.5 s to
write buffered, 0.11 s direct). A file system that refuses O_DIRECT (ramfs) gets buffered writes, then has the file's
pages dropped from the cache at each save.
"""
import collections
import errno
import fcntl
import hashlib
import heapq
import mmap
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from client import KEPT, check_kept
from utils.run_files import SaveError

FOLDER = "clients"  # in the run folder
DIRECT_MIN = 1 << 16  # bytes: records this large are written and read past the page cache (O_DIRECT)
ALIGN = 4096  # bytes: O_DIRECT's unit of offsets, lengths and buffers (the page size, the largest logical block)
# threads a save writes its records with, each through its own staging buffer: SHA-256 and the transfers release the
# GIL, and nothing else runs during a save (a round's 100 records of the CNN at 1000 clients, the save in all: 0.18 to
# 0.20 s with one thread, 0.10 to 0.15 s with two; three or four gained nothing more on 2 cores)
WRITERS = 2


def slot_bytes(record_bytes):
    """The bytes a slot of a fresh run's file takes for a record of `record_bytes`."""
    return -(-record_bytes // ALIGN) * ALIGN if record_bytes >= DIRECT_MIN else record_bytes


class StoreError(ValueError):
    """A record the checkpoint names is missing from the store, or not what was saved."""


class ClientStore:
    def __init__(self, run_dir, numels, memory_mb, resume):
        """`numels`: per thing a client keeps (client.KEPT), the entries of its tensors, or None when clients keep
        none of it (client.kept_numels). A run that is not `resume`d starts its files empty."""
        self.folder = os.path.join(run_dir, FOLDER)
        self.numels = {name: list(n) for name, n in numels.items() if n is not None}
        self.record_bytes = {name: 4 * sum(n) for name, n in self.numels.items()}
        self.slot_bytes = {name: slot_bytes(size) for name, size in self.record_bytes.items()}  # restore: the table's
        self.budget = memory_mb * 2**20
        self.cached = collections.OrderedDict()  # (name, client) -> its tensors, the least recently used first
        self.cached_bytes = 0
        self.dirty = set()  # cached records changed since they were last written
        self.saved = {name: {} for name in self.numels}  # client -> (slot, digest): what the last checkpoint names
        self.written = {name: {} for name in self.numels}  # client -> (slot, digest): written since, not yet named
        self.free = {name: [] for name in self.numels}  # a heap of the slots below `ends` that no record holds
        self.ends = {name: 0 for name in self.numels}  # slots in the file
        self.files = {}  # name -> its open file descriptor
        self.direct = set()  # the names whose file is open with O_DIRECT
        # (name, writer) -> a page-aligned buffer of one slot, through which a writer's records are written (writer 0's
        # are read too)
        self.staging = {}
        self.fresh = not resume
        self.unsynced = set()  # files written since their last fsync

    def get(self, name, client_id):
        """`client_id`'s `name` (flat f32 tensors on the CPU, shared: not to be changed in place), or None."""
        key = (name, client_id)
        if key in self.cached:
            self.cached.move_to_end(key)
            return self.cached[key]
        where = self.written[name].get(client_id) or self.saved[name].get(client_id)
        if where is None:
            return None
        tensors = self._read(name, where[0])
        self._cache(key, tensors)
        return tensors

    def put(self, name, client_id, tensors):
        """Keep `tensors` as `client_id`'s `name` from now on."""
        tensors = [t.detach().to("cpu", torch.float32) for t in tensors]
        if [t.numel() for t in tensors] != self.numels[name]:  # the file's slots hold exactly this
            raise ValueError(f"client {client_id}'s {name} has tensors of {[t.numel() for t in tensors]} entries, "
                             f"this run's {self.numels[name]}")
        superseded = self.written[name].pop(client_id, None)
        if superseded:  # never named by a checkpoint: free at once
            heapq.heappush(self.free[name], superseded[0])
        self._cache((name, client_id), tensors)
        self.dirty.add((name, client_id))
        self._evict()

    def clients(self, name):
        """The ids of the clients that keep a `name`."""
        return set(self.saved[name]) | set(self.written[name]) | {c for n, c in self.cached if n == name}

    def flush(self):
        """Write every changed record, sync the files to disk, and return the table a checkpoint holds: per name, per
        client, (slot, SHA-256 digest of its record)."""
        for name in {name for name, _ in self.dirty}:
            self._file(name)  # opened here, not by two writers at once
        # slots are taken, and the written records named, in the records' order: neither the file's layout nor the
        # table's order (so checkpoint.pt's bytes) depends on which writer finished first
        jobs = [(key, self._take_slot(key[0]), self.cached[key]) for key in sorted(self.dirty)]
        for ((name, client_id), slot, _), digest in zip(jobs, self._write_all(jobs)):
            self.written[name][client_id] = (slot, digest)
        self.dirty.clear()
        for name in sorted(self.unsynced):
            try:
                os.fsync(self.files[name])
            except OSError as e:
                raise SaveError(f"cannot write {self._path(name)}: {e.strerror or e}") from None
            # on disk now, a buffered file's pages leave the kernel's page cache: kept, they fill it as the file grows,
            # and writing slows down as the kernel reclaims them (6000 clients of the CNN, a 1000 MB budget: a save
            # took 0.19 s until the file passed 2.4 GB, 0.45 s after; dropped, 0.21 s throughout)
            if name not in self.direct and hasattr(os, "posix_fadvise"):  # Linux
                os.posix_fadvise(self.files[name], 0, 0, os.POSIX_FADV_DONTNEED)
        self.unsynced.clear()
        return {"numels": self.numels, "slot_bytes": dict(self.slot_bytes),
                "records": {name: {**self.saved[name], **self.written[name]} for name in self.numels}}

    def committed(self, table):
        """The checkpoint holding `table` (flush's) is on disk: the slots only the previous one named are free."""
        for name, records in table["records"].items():
            for client_id, (slot, _) in self.saved[name].items():
                if records.get(client_id, (None,))[0] != slot:
                    heapq.heappush(self.free[name], slot)
            self.saved[name], self.written[name] = dict(records), {}

    def restore(self, table):
        """Take the records a checkpoint's `table` names, each read back and checked: StoreError when one is missing,
        differs from its digest (changed or damaged after it was saved), or holds NaN or Inf; ValueError when the
        table is not one this run's store wrote."""
        for name in sorted(set(table["numels"]) | set(self.numels)):
            theirs, ours = table["numels"].get(name), self.numels.get(name)
            if theirs != ours:
                raise ValueError(f"its clients keep a {name}, which this run's clients do not keep" if ours is None else
                                 f"its clients keep no {name}, which this run's clients keep" if theirs is None else
                                 f"its clients' {name} has tensors of {theirs} entries, this run's {ours}")
        if not set(table["records"]) <= set(self.numels) or not all(
                type(where) is tuple and len(where) == 2 and type(where[1]) is bytes
                for records in table["records"].values() for where in records.values()):
            raise ValueError("its table names records this run's clients do not keep, or records that are not a slot "
                             "and a digest")
        for name, records in table["records"].items():
            where = self._named(name)
            # checkpoints before O_DIRECT have no slot_bytes: their slots are their records
            sizes = table.get("slot_bytes", {})
            slot_size = sizes.get(name, self.record_bytes[name]) if isinstance(sizes, dict) else None
            if type(slot_size) is not int or slot_size not in (self.record_bytes[name],
                                                               slot_bytes(self.record_bytes[name])):
                raise ValueError(f"its table of {where} gives slots of {slot_size!r} bytes for records of "
                                 f"{self.record_bytes[name]}")
            self.slot_bytes[name] = slot_size
            slots = [slot for slot, _ in records.values()]
            if len(set(slots)) != len(slots) or any(type(slot) is not int or slot < 0 for slot in slots):
                raise ValueError(f"its table of {where} names a slot twice, or one that is not a slot")
            try:
                size = os.fstat(self._file(name)).st_size if records else 0
            except (OSError, SaveError) as e:
                raise StoreError(f"cannot read {where}: {e}") from None
            for client_id, (slot, digest) in sorted(records.items()):
                data = self._read_bytes(name, slot) if (slot + 1) * self.slot_bytes[name] <= size else None
                if data is None:
                    raise StoreError(f"{where} is missing or shorter than checkpoint.pt says (client {client_id})")
                if hashlib.sha256(data).digest() != digest:
                    raise StoreError(f"{where}: client {client_id}'s {name} does not match the SHA-256 digest saved "
                                     f"with it: it was changed or damaged after it was saved")
                try:
                    check_kept(f"client {client_id}'s {name}", self._tensors(name, data), self.numels[name])
                except ValueError as e:
                    raise StoreError(f"{where}: {e}") from None
            self.saved[name] = dict(records)
            self.ends[name] = max(slots, default=-1) + 1
            # an honest file never ends past twice the records its checkpoint names (those, and the ones changed since,
            # each written to the lowest free slot): a table naming slots far past them, over a sparse file that long
            # with digests to match, gets no free list as long as its slot numbers
            self.free[name] = sorted(set(range(min(self.ends[name], 2 * len(slots)))) - set(slots))

    def close(self):
        for descriptor in self.files.values():
            os.close(descriptor)
        for staging in self.staging.values():
            staging.close()
        self.files, self.staging, self.direct = {}, {}, set()

    def _cache(self, key, tensors):
        if key in self.cached:
            self.cached_bytes -= self.record_bytes[key[0]]
        self.cached[key] = tensors
        self.cached.move_to_end(key)
        self.cached_bytes += self.record_bytes[key[0]]

    def _evict(self):
        """Let the least recently used records go until the cache fits the budget; a changed one is written first."""
        while self.cached_bytes > self.budget and self.cached:
            key, tensors = self.cached.popitem(last=False)
            self.cached_bytes -= self.record_bytes[key[0]]
            if key in self.dirty:
                name, client_id = key
                slot = self._take_slot(name)
                self.written[name][client_id] = (slot, self._write(name, slot, tensors, 0))
                self.dirty.discard(key)

    def _take_slot(self, name):
        slot = heapq.heappop(self.free[name]) if self.free[name] else self.ends[name]
        self.ends[name] = max(self.ends[name], slot + 1)
        return slot

    def _write_all(self, jobs):
        """Write each (key, slot, tensors) of `jobs`, shared among WRITERS threads, each writing its share one record
        after another through its own staging buffer; the records' digests, in the order of `jobs`."""
        digests = [None] * len(jobs)

        def write_share(writer):
            for index in range(writer, len(jobs), WRITERS):
                (name, _), slot, tensors = jobs[index]
                digests[index] = self._write(name, slot, tensors, writer)
        if jobs:
            with ThreadPoolExecutor(WRITERS) as pool:
                list(pool.map(write_share, range(WRITERS)))  # list(): a writer's error is raised here
        return digests

    def _write(self, name, slot, tensors, writer):
        """Write `tensors` to `name`'s `slot`; the SHA-256 digest of the record."""
        staging = self._staging(name, writer)
        torch.cat([t.flatten() for t in tensors], out=torch.frombuffer(staging, dtype=torch.float32,
                                                                       count=self.record_bytes[name] // 4))
        digest = hashlib.sha256(memoryview(staging)[:self.record_bytes[name]]).digest()
        try:
            written = self._transfer(os.pwritev, name, slot, writer)
        except OSError as e:
            raise SaveError(f"cannot write {self._path(name)}: {e.strerror or e}") from None
        if written != self.slot_bytes[name]:
            raise SaveError(f"cannot write {self._path(name)}: {written} of {self.slot_bytes[name]} bytes written")
        self.unsynced.add(name)
        return digest

    def _read(self, name, slot):
        data = self._read_bytes(name, slot)
        if data is None:
            raise OSError(f"{self._named(name)} ends before slot {slot}")
        return self._tensors(name, data)

    def _read_bytes(self, name, slot):
        """The record in `slot`, or None where the file ends before it."""
        try:
            read = self._transfer(os.preadv, name, slot)
        except OSError as e:
            raise StoreError(f"cannot read {self._named(name)}: {e.strerror or e}") from None
        return bytearray(memoryview(self._staging(name, 0))[:self.record_bytes[name]]) \
            if read == self.slot_bytes[name] else None

    def _transfer(self, io, name, slot, writer=0):
        """os.pwritev or os.preadv of `slot` from or into `writer`'s staging buffer; the bytes moved. A file system
        that takes O_DIRECT on the file but refuses it at the transfer gets the file buffered, and the transfer
        again."""
        descriptor, offset, staging = self._file(name), slot * self.slot_bytes[name], self._staging(name, writer)
        direct = name in self.direct  # asked before the transfer: another writer may clear it meanwhile
        try:
            return io(descriptor, [staging], offset)
        except OSError as e:
            if e.errno != errno.EINVAL or not direct:
                raise
        fcntl.fcntl(descriptor, fcntl.F_SETFL, fcntl.fcntl(descriptor, fcntl.F_GETFL) & ~os.O_DIRECT)
        self.direct.discard(name)
        return io(descriptor, [staging], offset)

    def _staging(self, name, writer):
        if (name, writer) not in self.staging:  # anonymous: page-aligned, zeros past the record
            self.staging[name, writer] = mmap.mmap(-1, self.slot_bytes[name])
        return self.staging[name, writer]

    def _tensors(self, name, data):
        return list(torch.from_numpy(np.frombuffer(data, dtype=np.float32)).split(self.numels[name]))

    @staticmethod
    def _named(name):
        """`name`'s file as the run folder names it, for messages."""
        return f"{FOLDER}/{KEPT[name]}.bin"

    def _path(self, name):
        return os.path.join(self.folder, f"{KEPT[name]}.bin")

    def _file(self, name):
        """The open file of `name`'s records, with O_DIRECT where its slots are DIRECT_MIN or more and aligned, and the
        file system takes it. A fresh run's is made anew (a file or link left there is removed, never written through);
        a resumed run's must be a file, not a link."""
        if name not in self.files:
            path = self._path(name)
            try:
                os.makedirs(self.folder, exist_ok=True)
                if self.fresh and os.path.lexists(path):
                    os.unlink(path)
                flags = os.O_RDWR | os.O_NOFOLLOW | (os.O_CREAT | os.O_EXCL if self.fresh else 0)
                descriptor = os.open(path, flags, 0o644)
            except OSError as e:
                raise SaveError(f"cannot open {path}: {e.strerror or e}") from None
            self.files[name] = descriptor
            # set on the open file rather than asked at the open: Linux makes the file before it refuses the flag
            if self.slot_bytes[name] >= DIRECT_MIN and self.slot_bytes[name] % ALIGN == 0 and hasattr(os, "O_DIRECT"):
                try:
                    fcntl.fcntl(descriptor, fcntl.F_SETFL, fcntl.fcntl(descriptor, fcntl.F_GETFL) | os.O_DIRECT)
                    self.direct.add(name)
                except OSError:  # the file stays buffered
                    pass
        return self.files[name]
