"""The default engine: the sampled clients train in this process, one after another on one shared model, or, with
`--parallel N`, N at once on as many threads, each on a model of its own.

Clients own no model: each trains a `workspace` model in turn, from the server's state, so memory does not grow with
the number of clients beyond their index lists. What a client keeps between rounds (its error-feedback residual, its
sparsifier's memory) lives in the run's client store (client_store.py), which hands it over for the client's training
and takes it back after; only this process's main thread touches the store, in the clients' order. What a client
downloads is counted by the server (downloads.py); that applying it gives the client exactly the server's state is
what the Flower engines check on every node, and tests/test_downloads.py here.

Why threads: a small model's batches keep torch's threads poorly busy (on 2 cores a plain loop trains 100 clients of
the CNN in 0.66 of the time on 2 threads that it takes on 1, not in half), so two clients at once, on one thread each,
get through a round's clients sooner.
Each client trains with `client_threads` torch threads (engines.client_threads: this process's shared among the
clients that train at once); a client's upload depends on that count in its last digits, never on which thread ran
it or when, so a run with --parallel N gives the metrics of a run that trains one client at a time with as many
threads, bit for bit.
"""
import collections
import contextlib
import copy
import queue
import threading
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

import torch
import torch.nn.functional as F

from client import Client
from engines import client_threads
from utils.run_files import RunError
from utils.seeding import derive_seed


class InProcess:
    secure_sum = None  # the server sums the uploads itself, under secure aggregation too (secure.py simulates it)

    def __init__(self, conf, dataset, shares, workspace, store, parallel=1, client_cpus=None):
        self.dataset = dataset
        self.store = store
        self.clients = [Client(i, share, conf) for i, share in enumerate(shares)]
        self.last_trained = []
        self.parallel = parallel
        self.client_threads = client_threads(parallel, client_cpus)
        if parallel > 1:
            check_parallel(workspace, dataset, shares, conf, parallel)
        self.workspace = workspace  # the model that clients train on one at a time
        self.workspaces = [workspace] + [copy.deepcopy(workspace) for _ in range(parallel - 1)]  # at once: one each

    def train(self, chosen, syncs, global_state, round_index, progress=None):
        self.last_trained = chosen
        device = next(iter(global_state.values())).device
        with torch_threads(self.client_threads):
            if self.parallel > 1:
                return self._train_at_once(chosen, global_state, round_index, progress, device)
            uploads = []
            for position, client_id in enumerate(chosen):
                trained = self._train(self.workspace, client_id, self._kept(client_id, device), global_state,
                                      round_index, self._steps(progress, position, len(chosen)))
                uploads.append(self._keep(client_id, trained))
            return uploads

    def _train_at_once(self, chosen, global_state, round_index, progress, device):
        """Train `chosen` on `parallel` threads; their uploads in the order of `chosen`. At most twice as many clients
        as threads hold their kept state at a time. Raises RunError if the model drew from torch's global generator
        (check_no_draws)."""
        idle, stop = queue.SimpleQueue(), threading.Event()
        for workspace in self.workspaces:
            idle.put(workspace)

        def train_one(client_id, kept, steps):
            workspace = idle.get()
            try:
                return self._train(workspace, client_id, kept, global_state, round_index, steps)
            finally:
                idle.put(workspace)

        def steps_until_stopped(position):
            shown = self._steps(progress, position, len(chosen))

            def step(done, total):
                if stop.is_set():  # the round was abandoned (a stop, another client's error): give up at once
                    raise Abandoned
                if shown:
                    shown(done, total)
            return step

        uploads, running = [], collections.deque()
        # threads made in the block start with its thread count (torch reads it at a thread's first parallel work)
        pool = ThreadPoolExecutor(self.parallel, thread_name_prefix="client")
        try:
            for position, client_id in enumerate(chosen):
                running.append((client_id, pool.submit(train_one, client_id, self._kept(client_id, device),
                                                       steps_until_stopped(position))))
                if len(running) >= 2 * self.parallel:
                    uploads.append(self._keep(*oldest(running)))
            while running:
                uploads.append(self._keep(*oldest(running)))
        finally:
            stop.set()
            pool.shutdown(wait=True, cancel_futures=True)
        check_no_draws([self.clients[client_id] for client_id in chosen], round_index)
        return uploads

    def _kept(self, client_id, device):
        """What `client_id` kept from its last round (client.KEPT), on the model's device."""
        kept = {name: self.store.get(name, client_id) for name in self.store.numels}
        return {name: tensors and [t.to(device) for t in tensors] for name, tensors in kept.items()}

    def _train(self, workspace, client_id, kept, global_state, round_index, steps):
        """Train `client_id` on `workspace` from `kept`; (its Upload, what it keeps now)."""
        client = self.clients[client_id]
        for name, tensors in kept.items():
            setattr(client, name, tensors)
        upload = client.local_train(workspace, global_state, self.dataset, round_index, steps)
        left = {name: getattr(client, name) for name in kept}
        for name in kept:
            setattr(client, name, None)
        return upload, left

    def _keep(self, client_id, trained):
        upload, left = trained
        for name, tensors in left.items():
            if tensors is not None:
                self.store.put(name, client_id, tensors)
        return upload

    @staticmethod
    def _steps(progress, position, count):
        return (lambda step, total: progress(position, count, step, total)) if progress else None

    def drop(self, dropped):
        """The uploads of the clients `dropped` were discarded (they came too late): they keep all of their diffs. The
        others of the last round let go of what they would have kept instead."""
        for client_id in self.last_trained:
            client = self.clients[client_id]
            if client_id in dropped and client.residual_if_dropped is not None:
                self.store.put("residual", client_id, client.residual_if_dropped)
            client.residual_if_dropped = None

    def client_state(self):
        return {"models": {}}  # no client keeps a model here: each trains from the server's

    def restore_client_state(self, state):
        pass


def oldest(running):
    """Take the oldest of the `running` (client id, future) pairs once it is done: (its client id, its result). A
    client's error is raised as soon as it happens, whichever client it is: waiting for the older ones to finish first
    would keep a failed round training."""
    waiting = set()
    for _, future in running:
        if not future.done():
            waiting.add(future)
        elif future.exception():
            raise future.exception()
    client_id, first = running[0]
    while not first.done():
        done, waiting = wait(waiting, return_when=FIRST_COMPLETED)
        for future in done:
            if future.exception():
                raise future.exception()
    running.popleft()
    return client_id, first.result()


def check_no_draws(clients, round_index):
    """After `clients` trained at once: torch's global generator must be as the last of them to start seeded it (each
    seeds it before training). Otherwise the model drew from it, on inputs check_parallel's step did not meet, and
    the round's uploads are not those of clients trained one at a time: raise RunError (the round is not saved).
    It sees the draws made after the last client seeded it: a model that draws on some batch of every client is seen
    at the round's last; one whose draws all came before that goes unseen."""
    state = torch.random.get_rng_state()
    seeded = (torch.Generator().manual_seed(derive_seed(*c.dropout_stream(round_index))).get_state() for c in clients)
    if not any(torch.equal(state, fresh) for fresh in seeded):
        raise RunError(f"round {round_index}: the model drew from torch's global random generator while clients "
                       f"trained at once (dropout on some inputs, say), so the round's uploads are not those of "
                       f"clients trained one at a time; it was not saved: continue the saved rounds with --resume, "
                       f"without --parallel")


class Abandoned(Exception):
    """A client's training was given up because its round was."""


@contextlib.contextmanager
def torch_threads(count):
    """torch's thread count set to `count` in the block, put back after."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def check_device(parallel, device):
    """Refuse clients at once on a GPU, where they would queue on one device anyway (the Flower engines share GPUs out
    among their actors)."""
    if parallel > 1 and device.type != "cpu":
        raise RunError(f"--parallel {parallel} trains clients at once on this process's CPU threads, and this run "
                       f"trains on {device.type}: leave --parallel out, or use --engine flower with --client-gpus")


def check_parallel(model, dataset, shares, conf, parallel):
    """Refuse clients training at once where they could not give the uploads of clients trained one at a time: on a
    GPU (check_device), or with a model that draws from torch's global random generator as it trains (dropout does;
    each client seeds it before training, and clients at once would take each other's draws). The draws are looked
    for in one step on a copy of the model, which leaves the generator as it was; a model that draws only on some
    inputs would escape it."""
    check_device(parallel, next((p.device for p in model.parameters()), torch.device("cpu")))
    share = next((share for share in shares if len(share)), None)
    if share is None:
        return
    images, labels = next(dataset.train_batches(share, conf["batch_size"], torch.Generator().manual_seed(0)))
    probe = copy.deepcopy(model).train()
    saved = torch.random.get_rng_state()
    try:
        F.cross_entropy(probe(images), labels).backward()
        draws = not torch.equal(saved, torch.random.get_rng_state())
    finally:
        torch.random.set_rng_state(saved)
    if draws:
        raise RunError(f"--parallel {parallel}: the model ({conf['model_name']}) draws from torch's global random "
                       f"generator as it trains (dropout does), so clients training at once would take each other's "
                       f"draws: leave --parallel out, or use --engine flower, whose clients train in processes of "
                       f"their own")
