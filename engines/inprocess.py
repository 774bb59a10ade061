"""The default engine: every sampled client trains in this process, one after another, on one shared model.

Clients own no model: each trains the one `workspace` model in turn, from the server's state, so memory does not grow
with the number of clients beyond their index lists (and, with error feedback, the residuals of clients that have
trained). What a client downloads is counted by the server (downloads.py); that applying it gives the client exactly
the server's state is what the Flower engines check on every node, and tests/test_downloads.py here.
"""
from client import KEPT, Client


class InProcess:
    def __init__(self, conf, dataset, shares, workspace):
        self.dataset = dataset
        self.workspace = workspace
        self.clients = [Client(i, share, conf) for i, share in enumerate(shares)]
        self.last_trained = []

    def train(self, chosen, syncs, global_state, round_index, progress=None):
        uploads, self.last_trained = [], chosen
        for position, client_id in enumerate(chosen):
            steps = (lambda step, total: progress(position, len(chosen), step, total)) if progress else None
            uploads.append(self.clients[client_id].local_train(self.workspace, global_state, self.dataset,
                                                               round_index, steps))
        return uploads

    def drop(self, dropped):
        """The uploads of the clients `dropped` were discarded (they came too late): they keep all of their diffs. The
        others of the last round let go of what they would have kept instead."""
        for client_id in self.last_trained:
            client = self.clients[client_id]
            if client_id in dropped:
                client.dropped()
            client.residual_if_dropped = None

    def client_state(self):
        # no client keeps a model here: each trains from the server's
        kept = {key: {str(c.id): getattr(c, name) for c in self.clients if getattr(c, name) is not None}
                for name, key in KEPT.items()}
        return {**kept, "models": {}}

    def restore_client_state(self, state):
        for name, key in KEPT.items():
            for client_id, tensors in state[key].items():
                setattr(self.clients[int(client_id)], name, tensors)
