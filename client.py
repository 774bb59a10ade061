"""A client: its share of the training data, the seed of its mask, and local training that returns an encoded upload.

Clients own no model: every client trains the one shared `model` it is handed, so memory does not grow with the
number of clients beyond their index lists (and, with error feedback, the residuals of clients that have trained).
"""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from utils import payload
from utils.seeding import derive_seed, generator


@dataclass
class Upload:
    client_id: int
    payload: bytes  # what travels to the server; its length is the upload's size
    entries_sent: int  # how many diff entries the payload carries
    train_loss: float  # mean loss over the client's local steps


class Client:
    def __init__(self, client_id, indices, conf):
        self.id = client_id
        self.indices = indices  # CPU int64 positions of this client's examples in the training split
        self.conf = conf
        self.residual = None  # error feedback: flat tensors of what was not sent yet

    def mask_seed(self, round_index):
        """The seed of this client's random mask: drawn once (the chapter's fixed mask) or anew each round."""
        if self.conf["mask"] == "fixed":
            return derive_seed(self.conf["seed"], "mask", self.id)
        return derive_seed(self.conf["seed"], "mask", self.id, round_index)

    def local_train(self, model, global_state, dataset, round_index, progress=None):
        """Train `model` from `global_state` for local_epochs of SGD on this client's data; return its Upload."""
        conf = self.conf
        model.load_state_dict(global_state)
        model.train()
        optimizer = torch.optim.SGD(model.parameters(), lr=conf["lr"], momentum=conf["momentum"])
        shuffle = generator(conf["seed"], "shuffle", round_index, self.id)
        torch.manual_seed(derive_seed(conf["seed"], "dropout", round_index, self.id))  # models with dropout (VGG)
        steps_per_epoch = math.ceil(len(self.indices) / conf["batch_size"])
        loss_sum, steps = 0.0, 0
        for _ in range(conf["local_epochs"]):
            for images, labels in dataset.train_batches(self.indices, conf["batch_size"], shuffle):
                optimizer.zero_grad(set_to_none=True)
                loss = F.cross_entropy(model(images), labels)
                loss.backward()
                optimizer.step()
                loss_sum += loss.detach()
                steps += 1
                if progress:
                    progress(steps, steps_per_epoch * conf["local_epochs"])
        return self._upload(model, global_state, round_index, float(loss_sum) / max(steps, 1))

    def _upload(self, model, global_state, round_index, train_loss):
        local_state = model.state_dict()
        names = [name for name, value in global_state.items() if torch.is_floating_point(value)]
        diffs = [(local_state[name] - global_state[name]).flatten() for name in names]
        if self.residual is not None:
            diffs = [diff + residual for diff, residual in zip(diffs, self.residual)]
        kind, positions, seed = self._select(diffs, round_index)
        encoded = payload.encode(kind, diffs, positions, len(self.indices), seed, self.conf["prop"])
        if self.conf["error_feedback"]:
            decay = self.conf["residual_decay"]
            self.residual = [_unsent(diff, kept).mul_(decay) for diff, kept in zip(diffs, positions)]
        entries = sum(diff.numel() if kept is None else len(kept) for diff, kept in zip(diffs, positions))
        return Upload(self.id, encoded, entries, train_loss)

    def _select(self, diffs, round_index):
        """(payload kind, positions to send per tensor, mask seed) under the configured sparsifier."""
        conf = self.conf
        if conf["sparsifier"] == "none":
            return payload.DENSE, [None] * len(diffs), 0
        if conf["sparsifier"] == "random":
            seed = self.mask_seed(round_index)
            return payload.RANDOM, payload.random_positions(seed, conf["prop"], [d.numel() for d in diffs]), seed
        return payload.TOPK, topk_positions(diffs, conf["prop"], conf["topk_scope"]), 0


def topk_positions(diffs, prop, scope="tensor"):
    """Sorted flat positions of the largest |entries|: ceil(prop * numel) per tensor, or of the whole model."""
    if scope == "tensor":
        return [d.abs().topk(kept_count(prop, d.numel()), sorted=False).indices.sort().values for d in diffs]
    flat = torch.cat([d.abs() for d in diffs])
    chosen = flat.topk(kept_count(prop, flat.numel()), sorted=False).indices.sort().values
    bounds = torch.tensor([0] + [d.numel() for d in diffs], device=chosen.device).cumsum(0)
    cuts = torch.searchsorted(chosen, bounds).tolist()
    return [chosen[cuts[i]:cuts[i + 1]] - bounds[i] for i in range(len(diffs))]


def kept_count(prop, numel):
    """ceil(prop * numel), ignoring float noise: prop 0.07 of 100 entries keeps 7, although 0.07 * 100 > 7."""
    return math.ceil(round(prop * numel, 9))


def _unsent(diff, kept):
    """The part of `diff` that `kept` leaves behind (error feedback's residual)."""
    if kept is None:
        return torch.zeros_like(diff)
    residual = diff.clone()
    residual[kept.to(diff.device)] = 0
    return residual
