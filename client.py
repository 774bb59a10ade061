"""A client: its share of the training data, the seed of its mask, and local training that returns an encoded upload.

What the upload carries and how it is coded is the compression method's business (codec/); with error feedback the
client keeps what the server will not reconstruct (unsent entries and quantization error) and adds it to its next diff.
A client also keeps its sparsifier's memory between uploads (PowerSGD's warm start). Between its rounds both live in
the run's client store (client_store.py, KEPT).
"""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import clock
import codec
import privacy
import robust
from utils.seeding import derive_seed, generator, seed_torch

# what a client keeps from one round to the next: its attribute -> its key in the checkpoint's client state
KEPT = {"residual": "residuals", "memory": "memories"}


def kept_numels(conf, shapes):
    """Per thing a client keeps (KEPT), the entries of its tensors for a model of `shapes` under `conf`; None when its
    clients keep none."""
    return {"residual": [math.prod(shape) for shape in shapes] if conf["error_feedback"] else None,
            "memory": codec.memory_numels(conf, shapes)}


def mask_seed(conf, client_id, round_index):
    """The seed of a client's random mask: drawn once (the chapter's fixed mask), anew each round, or one per round
    that every client shares (so the server knows, before any upload, which entries can move)."""
    if conf["mask"] == "fixed":
        return derive_seed(conf["seed"], "mask", client_id)
    if conf["mask"] == "round":
        return derive_seed(conf["seed"], "mask", client_id, round_index)
    return derive_seed(conf["seed"], "shared mask", round_index)


def check_kept(what, tensors, numels):
    """Raise ValueError unless `tensors` is what a client keeps of tensors of `numels` entries: that many flat, finite
    f32 tensors of those sizes. Checked where it comes from outside (a node's reply, a checkpoint), since one of
    another size fails or broadcasts only when the client next trains, and a NaN one spoils every later upload."""
    if not isinstance(tensors, (list, tuple)) or len(tensors) != len(numels):
        raise ValueError(f"{what} is not {len(numels)} tensors")
    for tensor, numel in zip(tensors, numels):
        if not isinstance(tensor, torch.Tensor) or tensor.dtype != torch.float32 or tensor.shape != (numel,):
            raise ValueError(f"{what} is not flat f32 tensors of {', '.join(map(str, numels))} entries")
        if not codec.all_finite([tensor]):
            raise ValueError(f"{what} holds NaN or Inf")


def local_steps(examples, conf):
    """The SGD steps a client with `examples` training examples takes in a round."""
    return math.ceil(examples / conf["batch_size"]) * conf["local_epochs"]


@dataclass
class Upload:
    client_id: int
    payload: bytes  # what travels to the server; its length is the upload's size
    train_loss: float  # mean loss over the client's local steps
    problem: str | None = None  # set by a transport when nothing usable came back (an error, a timeout, garbage)


class Client:
    def __init__(self, client_id, indices, conf):
        self.id = client_id
        self.indices = indices  # CPU int64 positions of this client's examples in the training split
        self.conf = conf
        self.residual = None  # error feedback: flat tensors of what the server has not received yet
        self.memory = None  # what the sparsifier carries from one upload to the next (PowerSGD's warm start)
        # under a deadline or over-selection: the residual to keep instead if the server discards the last upload
        self.residual_if_dropped = None

    def mask_seed(self, round_index):
        return mask_seed(self.conf, self.id, round_index)

    def dropout_stream(self, round_index):
        """The stream (seeding.seed_torch's parts) that torch's global generators are seeded with before this client
        trains: a model's dropout draws from them."""
        return self.conf["seed"], "dropout", round_index, self.id

    def rounding_seed(self, round_index):
        """The seed of this client's random rounding (QSGD's levels): new every round, whatever `mask` says, since
        rounding drawn alike every round would make the same errors every round."""
        return derive_seed(self.conf["seed"], "rounding", round_index, self.id)

    def local_train(self, model, global_state, dataset, round_index, progress=None):
        """Train `model` from `global_state` for local_epochs of SGD on this client's data; return its Upload."""
        conf = self.conf
        model.load_state_dict(global_state)
        model.train()
        optimizer = torch.optim.SGD(model.parameters(), lr=conf["lr"], momentum=conf["momentum"])
        shuffle = generator(conf["seed"], "shuffle", round_index, self.id)
        seed_torch(*self.dropout_stream(round_index))  # models with dropout (VGG)
        total_steps = local_steps(len(self.indices), conf)
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
                    progress(steps, total_steps)
        return self._upload(model, global_state, round_index, float(loss_sum) / max(steps, 1))

    def _upload(self, model, global_state, round_index, train_loss):
        local_state = model.state_dict()
        names = [name for name, value in global_state.items() if torch.is_floating_point(value)]
        diffs = [(local_state[name] - global_state[name]).flatten() for name in names]
        if self.residual is not None:
            diffs = [diff + residual for diff, residual in zip(diffs, self.residual)]
        seeds = self.mask_seed(round_index), self.rounding_seed(round_index)
        num_samples = len(self.indices)
        shapes = [global_state[name].shape for name in names]
        memory = self.memory
        if privacy.clips_on_client(self.conf):
            # DP's clipping is the client's. What it cuts is not fed back, as under the server's clipping (the client
            # never learns of that): fed back, it kept the uploads at the bound with stale mass, and cost 2.1 points
            # of accuracy (0.768 against 0.789, fixed 8-bit at 1000 clients, 30 rounds); the rounding's error is
            encoded, diffs = privacy.encode_clipped(diffs, self.conf, round_index,
                                                    lambda sent: codec.encode(self.conf, sent, num_samples, *seeds,
                                                                              shapes))
        else:
            encoded = codec.encode(self.conf, diffs, num_samples, *seeds, shapes, memory)
        self.memory = encoded.memory
        if self.conf["error_feedback"]:
            decay = self.conf["residual_decay"]
            if clock.may_drop(self.conf):  # if the upload is discarded, nothing was received: all of it is kept
                self.residual_if_dropped = [diff * decay for diff in diffs]
            self.residual = [unreceived(diff, kept, sent).mul_(decay)
                             for diff, kept, sent in zip(diffs, encoded.positions, encoded.values)]
        if robust.attacks(self.conf, self.id, round_index):
            # it keeps an honest client's residual and memory, so that its attack has the same strength every round,
            # and sends its attacked diff through the same codec, from the memory the honest encode started from
            attacked, num_samples = robust.attack(self.conf, diffs, num_samples, self.id, round_index)
            encoded = codec.encode(self.conf, attacked, num_samples, *seeds, shapes, memory)
        return Upload(self.id, encoded.payload, train_loss)


def unreceived(diff, kept, sent):
    """`diff` minus what the server reconstructs of it: `sent` at the positions `kept` (every entry when None)."""
    if kept is None:
        return diff - sent
    residual = diff.clone()
    residual[kept.to(diff.device)] -= sent
    return residual
