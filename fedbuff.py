"""Asynchronous aggregation, FedBuff (Nguyen et al., 2022): config key `mode: async`, on the simulated clock.

`concurrency` clients train at once. Each starts at a moment of the simulated clock: it syncs to the model current
then (the download methods' replay, changed entries or dense model), trains, and its upload arrives when its download,
compute and upload times (clock.py) have passed. The server takes uploads in order of arrival (ties broken by a seeded
order), weighting each by its staleness s, the server steps taken since its client started: 1/sqrt(1 + s) by default.
Each time `buffer_size` uploads have arrived the server steps (aggregate, roll back if the validation loss blew up,
evaluate): one row of metrics.csv, so `global_epochs` counts server steps. A client whose upload arrived is replaced by
a newly sampled one (among the clients online and not training), which starts after the step that upload completed,
or at once when the buffer is not yet full.

A client trains when it starts, from the model it synced to (nothing else could change what it computes); its upload
waits in flight until its arrival time. What is in flight is saved in the checkpoint, so a run resumes exactly.
"""
import dataclasses
import heapq
import math

import numpy as np

import clock
from client import Upload
from utils.seeding import derive_seed


@dataclasses.dataclass
class Flight:
    """A client training, or its upload on its way."""
    arrival_s: float
    tie: int  # seeded: orders arrivals at the same instant
    start_s: float
    base_step: int  # server steps taken when it started
    timing: clock.Timing
    upload: Upload

    def __lt__(self, other):
        return (self.arrival_s, self.tie) < (other.arrival_s, other.tie)


class FedBuff:
    """The timeline of an asynchronous run: the clock, the clients in flight, the server steps taken. federation.py's
    play_step takes each full buffer from it and steps the server."""

    def __init__(self, conf, server, transport, timer, sample):
        self.conf, self.server, self.transport, self.timer = conf, server, transport, timer
        self.sample = sample  # federation.sample_clients: the one sampling rule
        self.now = 0.0  # the simulated clock
        self.steps = 0  # server steps taken
        self.started = 0  # clients started so far: names each start's seeded draws
        self.flights = []  # a heap, by arrival
        self.syncs = []  # (bytes, kind) of the clients started since the last step: the next row's downloads

    def take_buffer(self, step_index):
        """Start clients up to `concurrency`, then take arrivals until `buffer_size` uploads have come (starting a
        client in place of each but the last); returns (the buffer's Flights, those of clients whose node failed, which
        count for nothing, the syncs of the clients started since the last step)."""
        self._fill(step_index)
        buffer, failed = [], []
        while len(buffer) < self.conf["buffer_size"] and self.flights:
            flight = heapq.heappop(self.flights)
            self.now = flight.arrival_s
            (failed if flight.upload.problem else buffer).append(flight)
            if len(buffer) < self.conf["buffer_size"]:
                self._fill(step_index, {f.upload.client_id for f in buffer + failed})
        syncs, self.syncs = self.syncs, []
        return buffer, failed, syncs

    def weights(self, buffer):
        """Per client id in the buffer, its upload's staleness weight."""
        return {f.upload.client_id: self._weight(self.steps - f.base_step) for f in buffer}

    def stepped(self, buffer, before):
        """The server stepped on `buffer` (or kept its model), which began at simulated second `before`: count the step;
        returns the row's time columns."""
        staleness = [self.steps - f.base_step for f in buffer]
        self.steps += 1
        return {"round_seconds": round(self.now - before, 6), "sim_seconds": round(self.now, 6), "dropped": 0,
                "dropped_download_bytes": 0, "dropped_upload_bytes": 0,
                "staleness": round(sum(staleness) / max(len(staleness), 1), 6),
                "timings": [{**f.timing.row(), "start_s": f.start_s, "staleness": s}
                            for f, s in zip(buffer, staleness)]}

    def _weight(self, staleness):
        return 1.0 / math.sqrt(1 + staleness) if self.conf["staleness"] == "inverse_sqrt" else 1.0

    def _fill(self, step_index, waiting=()):
        """Start clients at the current time until `concurrency` are in flight (fewer when too few are online and
        idle). A client whose upload waits in the buffer (`waiting`) starts again only after the step: so each client
        trains at most once per step, and its seeded draws (named by the step) never repeat."""
        while len(self.flights) < self.conf["concurrency"]:
            online = self.timer.online(step_index)
            busy = np.array(sorted({f.upload.client_id for f in self.flights} | set(waiting)), dtype=np.int64)
            idle = np.setdiff1d(np.arange(self.conf["no_models"]) if online is None else online, busy)
            if not len(idle):
                return
            self.started += 1
            client_id = self.sample(self.conf, f"start {self.started}", idle, 1)[0]
            self._start(client_id)

    def _start(self, client_id):
        sync, kind = self.server.sync(client_id)
        self.syncs.append((sync, kind))
        upload = self.transport.train([client_id], {client_id: sync}, self.server.global_state(),
                                      self.steps + 1)[0]
        timing = self.timer.play_one(client_id, len(sync), len(upload.payload))
        tie = derive_seed(self.conf["seed"], "arrival ties", self.started)
        heapq.heappush(self.flights, Flight(self.now + timing.finish_s, tie, self.now, self.steps, timing, upload))

    def state(self):
        """What the checkpoint keeps: the clock, the steps, the starts, the uploads in flight."""
        return {"now": self.now, "steps": self.steps, "started": self.started,
                "flights": [dataclasses.asdict(f) for f in self.flights]}

    def restore(self, state, steps):
        """Put back what state() saved after `steps` server steps; ValueError when it is not such a timeline."""
        self.now, self.steps, self.started = float(state["now"]), int(state["steps"]), int(state["started"])
        self.flights = [Flight(**{**f, "timing": clock.Timing(**f["timing"]), "upload": Upload(**f["upload"])})
                        for f in state["flights"]]
        clients = [f.upload.client_id for f in self.flights]
        if self.steps != steps or not math.isfinite(self.now) or self.now < 0:
            raise ValueError(f"its asynchronous timeline is not one of {steps} server steps")
        if len(clients) > self.conf["concurrency"] or len(set(clients)) != len(clients) or not all(
                0 <= c < self.conf["no_models"] and math.isfinite(f.arrival_s) and f.arrival_s >= self.now
                for c, f in zip(clients, self.flights)):
            raise ValueError("its clients in flight are not this run's")
        heapq.heapify(self.flights)
