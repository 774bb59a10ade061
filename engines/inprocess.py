"""The default engine: every sampled client trains in this process, one after another, on one shared model.

Clients own no model: each trains the one `workspace` model in turn, from the server's state, so memory does not grow
with the number of clients beyond their index lists. What a client keeps between rounds (its error-feedback residual,
its sparsifier's memory) lives in the run's client store (client_store.py), which hands it over for the client's
training and takes it back after. What a client downloads is counted by the server (downloads.py); that applying it
gives the client exactly the server's state is what the Flower engines check on every node, and tests/test_downloads.py
here.
"""
from client import Client


class InProcess:
    secure_sum = None  # the server sums the uploads itself, under secure aggregation too (secure.py simulates it)

    def __init__(self, conf, dataset, shares, workspace, store):
        self.dataset = dataset
        self.workspace = workspace
        self.store = store
        self.clients = [Client(i, share, conf) for i, share in enumerate(shares)]
        self.last_trained = []

    def train(self, chosen, syncs, global_state, round_index, progress=None):
        uploads, self.last_trained = [], chosen
        device = next(iter(global_state.values())).device
        for position, client_id in enumerate(chosen):
            client = self.clients[client_id]
            for name in self.store.numels:  # what it kept, on the model's device
                kept = self.store.get(name, client_id)
                setattr(client, name, kept and [t.to(device) for t in kept])
            steps = (lambda step, total: progress(position, len(chosen), step, total)) if progress else None
            uploads.append(client.local_train(self.workspace, global_state, self.dataset, round_index, steps))
            for name in self.store.numels:
                if getattr(client, name) is not None:
                    self.store.put(name, client_id, getattr(client, name))
                setattr(client, name, None)
        return uploads

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
