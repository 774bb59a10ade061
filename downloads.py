"""How the global model reaches the sampled clients, and what it costs: the download methods and each client's sync.

A download method (config key `download`) decides what a round broadcasts and so how the global model moves:
    dense       nothing is broadcast; each sampled client receives the global model, f32 (today's FedAvg).
    relay       the round's accepted uploads, as they arrived but claiming the example count the server weighed each
                by; a client replays them through the server's own aggregation code (server.Server), so its model is
                the server's bit for bit.
    compressed  the server's step plus its residual, coded by the codec under the download_* keys; the global model
                moves by exactly what was broadcast, decode(encode(step + residual)), and the residual keeps the rest.

Under relay and compressed, `Syncs` keeps the round messages (as many of the newest as cost less than the dense model
together), the round in which each entry last changed, and the round up to which each client is synchronized: an
integer per client. A sampled client receives the cheapest of (a) the messages it missed, replayed in order, (b) the
entries changed since its last sync, positions plus their f32 values, (c) the dense model. codec/ writes and reads
every byte of it (`encode_sync`); `apply_sync` is the client's side, run on a `Server` around the client's own model.
A round the server rolls back (Server.roll_back) is logged as one that kept the model: an empty message.
"""
import collections
import hashlib
import math

import torch

import codec
from client import check_kept, kept_numels
from codec.positions import true_positions
from utils.seeding import derive_seed

UNKNOWN = -1  # the version of a client whose model the server cannot vouch for


class Dense:
    name = "dense"
    help = "each sampled client receives the global model, f32 (every entry)"

    def __init__(self, conf, shapes):
        self.method = conf  # the codec method of its round messages (a relay's are the uploads)

    def broadcast(self, update, accepted, round_index):
        """(what the global model moves by, the round's message): the update itself; nothing is logged."""
        return update, None

    def commit(self):
        """The model moved by what broadcast returned: keep what goes with it."""

    def roll_back(self):
        """The last committed move was undone: go back to what was kept before it."""

    def state(self):
        return None

    def restore(self, state):
        pass


class Relay(Dense):
    name = "relay"
    help = "the round's accepted uploads are forwarded; each client aggregates them with the server's code (lossless)"

    def broadcast(self, update, accepted, round_index):
        # each forwarded claiming the count the server weighed it by, so that a client replaying the round weighs it
        # the same
        return update, [codec.with_num_samples(payload, count) for payload, count in accepted]

    @staticmethod
    def replay(replica, message):
        """Move `replica` (a Server around a client's model) as the server moved: the same uploads, the same code. A
        round that kept the model (no message) leaves it as it is."""
        if not message:
            return  # its aggregate would only make the sums of a round that accepted nothing
        for payload in message:
            problem = replica.receive(payload)
            if problem:
                raise codec.PayloadError(f"a relayed upload does not decode: {problem}")
        replica.aggregate()


class Compressed(Dense):
    name = "compressed"
    help = ("the server's step plus its residual, coded with download_sparsifier / download_prop / download_quantize "
            "/ download_topk_scope (and the upload's levels, bucket_size, topk_share, rank); the model moves by "
            "exactly what was broadcast")

    def __init__(self, conf, shapes):
        self.shapes, self.numels = shapes, [math.prod(shape) for shape in shapes]
        # the method's own parameters (QSGD's levels and buckets, the hybrid's share, PowerSGD's rank) are the upload's
        self.method = {**conf, "sparsifier": conf["download_sparsifier"], "prop": conf["download_prop"],
                       "quantize": conf["download_quantize"], "topk_scope": conf["download_topk_scope"],
                       "mask": "round"}
        self.error_feedback = conf["download_error_feedback"]
        self.seed = conf["seed"]
        self.residual = None  # what the server's steps have not yet broadcast (flat f32 tensors)
        self.memory = None  # what the sparsifier carries from one broadcast to the next (PowerSGD's warm start)
        self.pending = None  # (residual, memory) after the last broadcast, kept once the model moved by it
        self.previous = None  # (residual, memory) before the last commit

    def broadcast(self, update, accepted, round_index):
        step = update if self.residual is None else [u + r for u, r in zip(update, self.residual)]
        seeds = derive_seed(self.seed, "download mask", round_index), derive_seed(self.seed, "download rounding",
                                                                                 round_index)
        encoded = codec.encode(self.method, step, 0, *seeds, self.shapes, self.memory)
        try:
            moved = self.delta(encoded.payload, self.numels, self.method, step[0].device)
        except codec.PayloadError:
            # a huge step (one finite upload of 1e37 makes one) can code to a non-finite scale, which the decoder
            # refuses: its f32 mean magnitude overflows, or PowerSGD's M Q does and its factors are NaN. The step is
            # then as non-finite as one that moves the model to Inf, and the round keeps the model the same way
            moved = [torch.full_like(s, math.nan) for s in step]
        self.pending = ([s - m for s, m in zip(step, moved)] if self.error_feedback else None), encoded.memory
        return moved, [encoded.payload]

    def commit(self):
        self.previous = self.residual, self.memory
        self.residual, self.memory = self.pending

    def roll_back(self):
        self.residual, self.memory = self.previous

    @staticmethod
    def delta(payload, numels, method, device):
        """The dense f32 step a compressed message of `method` stands for, as the server and every client compute
        it."""
        _, positions, values = codec.decode(payload, numels, method)
        out = []
        for numel, kept, value in zip(numels, positions, values):
            if kept is None:
                out.append(value.to(device))
            else:
                out.append(torch.zeros(numel, device=device).index_put_((kept.to(device),), value.to(device)))
        return out

    @classmethod
    def replay(cls, replica, message):
        for payload in message:  # one payload, or none for a round that kept the model as it was
            problem, _ = replica.move(cls.delta(payload, replica.numels, replica.download.method,
                                                replica.globals[0].device))
            if problem:
                raise codec.PayloadError(f"a round's step does not apply: {problem}")

    def state(self):
        return {"residual": self.residual, "memory": self.memory}

    def restore(self, state):
        """Put back what state() saved, checked as a client's is (client.check_kept): a checkpoint's residual or warm
        start of another size failed only at the next broadcast, with a traceback."""
        # the sizes a client keeping this method's residual and memory would have: the same rule as a client's
        numels = kept_numels({**self.method, "error_feedback": self.error_feedback}, self.shapes)
        for name, what in (("residual", "residual"), ("memory", "warm start")):
            if state[name] is None:
                continue
            if numels[name] is None:
                raise ValueError(f"it holds a download {what}, which this run's download does not keep")
            check_kept(f"its download {what}", state[name], numels[name])
        self.residual, self.memory = state["residual"], state["memory"]


METHODS = {cls.name: cls for cls in (Dense, Relay, Compressed)}


class Syncs:
    """The server's side of keeping clients synchronized: what each holds, the messages they may miss, their cost."""

    def __init__(self, conf, numels, device):
        self.logs = conf["download"] != "dense"
        self.first_contact = conf["download_first_contact"]
        self.numels = numels
        self.dense_size = codec.dense_size(numels)
        self.version = 0  # rounds the global model has gone through (the initial model, from the seed, is 0)
        self.synced = {}  # client id -> the version it holds; absent until its first sync
        self.log = collections.deque()  # (version, message) of the newest rounds, oldest first
        self.log_bytes = 0
        # per entry, the version that last changed it: what a client at version v lacks is where this exceeds v
        self.last_changed = [torch.zeros(n, dtype=torch.int32, device=device) for n in numels] if self.logs else None
        self.dense_cache = (None, None)
        self.from_version = (None, {})  # (the version, {a client's version: its sync}): syncs made this version
        self.before = None  # what roll_back restores: the log and the changed entries' versions before the last round

    def record(self, message, changed):
        """The round's message (None: the model stayed as it was) and, per tensor, which entries it changed."""
        self.version += 1
        if not self.logs:
            return
        self.before = (collections.deque(self.log), self.log_bytes,
                       [(now, last[now]) for last, now in zip(self.last_changed, changed or [])])
        for last, now in zip(self.last_changed, changed or []):
            last[now] = self.version
        self._log(message or [])

    def roll_back(self):
        """The last round's move was undone: it is logged as a round that kept the model as it was (an empty message),
        and its entries' versions are what they were."""
        self.dense_cache = (None, None)  # coded at this version from the model before it went back
        self.from_version = (None, {})
        if not self.logs:
            return
        self.log, self.log_bytes, changed = self.before
        for last, (now, previous) in zip(self.last_changed, changed):
            last[now] = previous
        self._log([])

    def _log(self, message):
        self.log.append((self.version, message))
        self.log_bytes += replayed_size(message)
        while self.log_bytes > self.dense_size:  # a replay longer than this never beats the dense model
            _, oldest = self.log.popleft()
            self.log_bytes -= replayed_size(oldest)

    def sync(self, client_id, model):
        """(the bytes `client_id` downloads to hold the global model now, and which kind of sync they are: "replay",
        "changed" or "dense"); the client is then synchronized. `model()` gives the model's flat tensors, asked for only
        when the sync carries values."""
        held = self.synced.get(client_id)
        self.synced[client_id] = self.version
        if not self.logs:
            return self.dense(model), "dense"
        if held == UNKNOWN or (held is None and self.first_contact == "dense"):
            return codec.encode_sync(codec.DENSE, self.dense(model)), "dense"
        held = held or 0  # first contact from the seed: the client builds the initial model itself, for free
        if self.from_version[0] != self.version:
            self.from_version = (self.version, {})
        made = self.from_version[1]
        if held not in made:  # the same for every client at `held`: cross-device, most clients are at 0
            made[held] = self._sync_from(held, model)
        return made[held]

    def _sync_from(self, held, model):
        """The cheapest sync from version `held` to now, and its kind."""
        if held == self.version:
            return b"", "replay"  # nothing to download
        missed = [message for version, message in self.log if version > held]
        best = None
        if self.log and self.log[0][0] <= held + 1:
            best = (codec.replay_size(missed), "replay")
        dense_sync = (1 + self.dense_size, "dense")
        if best is None or dense_sync[0] < best[0]:
            best = dense_sync
        positions = [true_positions(last > held) for last in self.last_changed]
        changed_floor = 1 + codec.HEADER.size + 4 * sum(len(p) for p in positions)  # its values alone
        if changed_floor < best[0]:
            changed = codec.encode_sync(codec.CHANGED, codec.encode_entries(model(), positions))
            if len(changed) < best[0]:
                return changed, "changed"
        if best[1] == "replay":
            return codec.encode_sync(codec.REPLAY, missed), "replay"
        return codec.encode_sync(codec.DENSE, self.dense(model)), "dense"

    def forget(self, client_id):
        """`client_id`'s model is not known any more (its node failed or answered with another model): its next sync
        is the dense model."""
        self.synced[client_id] = UNKNOWN

    def dense(self, model):
        """The model as a dense f32 payload, coded once per version however many clients receive it."""
        version, payload = self.dense_cache
        if version != self.version:
            payload = codec.encode(codec.DENSE_F32, model(), 0).payload
            self.dense_cache = (self.version, payload)
        return payload

    def state(self):
        return {"version": self.version, "synced": dict(self.synced), "log": list(self.log),
                "last_changed": self.last_changed}

    def restore(self, state, method):
        """Put back what state() saved, checked: versions no later than the round, the log's messages payloads of
        `method` (the download's: its round messages) with finite values, per entry a version of its tensor's size."""
        self.version, self.synced = int(state["version"]), {int(c): int(v) for c, v in state["synced"].items()}
        if any(not UNKNOWN <= v <= self.version for v in self.synced.values()):
            raise ValueError(f"a client's synced version is not between {UNKNOWN} and the run's {self.version}")
        self.log = collections.deque((int(v), [bytes(p) for p in m]) for v, m in state["log"])
        for version, message in self.log:
            if not 0 < version <= self.version:
                raise ValueError(f"its message log holds round {version} of {self.version}")
            for payload in message:
                if not codec.all_finite(codec.decode(payload, self.numels, method)[2]):
                    raise ValueError(f"round {version}'s message holds NaN or Inf")
        self.log_bytes = sum(replayed_size(message) for _, message in self.log)
        if self.logs:
            last_changed = state["last_changed"]
            if (len(last_changed) != len(self.numels) or
                    any(t.shape != (n,) or t.dtype != torch.int32 for t, n in zip(last_changed, self.numels))):
                raise ValueError(f"its entries' versions are not int32 tensors of {self.numels} entries")
            if any(len(t) and not 0 <= int(t.min()) <= int(t.max()) <= self.version for t in last_changed):
                raise ValueError(f"an entry's version is not between 0 and the run's {self.version}")
            self.last_changed = list(last_changed)


def replayed_size(message):
    """What one round's message adds to a replay's length."""
    return codec.replay_size([message]) - codec.replay_size([])


def apply_sync(sync, replica, rounds_played):
    """The client's side: bring `replica` (a Server around the client's model) to the server's model by `sync`, sent
    after `rounds_played` rounds. PayloadError when it is not a sync that can bring it there: malformed, a replay of
    more rounds than were played, values that are not finite."""
    if not sync:
        return  # already up to date
    if replica.conf["download"] == "dense":  # the model itself, as a dense payload
        kind, content = codec.DENSE, sync
    else:
        kind, content = codec.decode_sync(sync, rounds_played)
    if kind == codec.REPLAY:
        for message in content:
            replica.download.replay(replica, message)
        return
    _, positions, values = codec.decode(content, replica.numels,
                                        codec.DENSE_F32 if kind == codec.DENSE else codec.CHANGED_ENTRIES)
    if not codec.all_finite(values):
        raise codec.PayloadError("the sync holds NaN or Inf")
    replica.overwrite(positions, values)


def checksum(tensors):
    """A digest of a model's flat floating tensors, bit for bit: a node sends it, the server compares it with its
    own."""
    digest = hashlib.sha256()
    for t in tensors:
        digest.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()
