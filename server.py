"""The server: owns the global model, decodes uploads into running sums, applies the aggregation rule, evaluates."""
import torch
import torch.nn.functional as F

import codec

EVAL_BATCH_SIZE = 256  # on a CPU, larger batches fall out of cache and run slower per image


class Server:
    def __init__(self, model, conf, device):
        self.model = model.to(device)
        self.conf = conf
        # the global model's floating tensors, in the order uploads carry them (flattened, in logical order)
        self.globals = [t for t in self.model.state_dict().values() if torch.is_floating_point(t)]
        self.numels = [t.numel() for t in self.globals]
        self.velocity = None  # server momentum buffer, created on first use
        self._start_round()

    def _start_round(self):
        # float64 sums: n_i * value cannot overflow them (f32 values times counts below 2^32 stay far below 1e308)
        self.weighted_sums = [t.new_zeros(t.numel(), dtype=torch.float64) for t in self.globals]  # sum of n_i * diff_i
        self.weights = [t.new_zeros(t.numel(), dtype=torch.float64) for t in self.globals]  # sum of n_i that sent it
        self.total_weight = 0  # sum of n_i over accepted uploads
        self.accepted = 0
        self.received_entries = 0  # diff entries carried by accepted uploads

    def global_state(self):
        return self.model.state_dict()

    def flat_globals(self):
        """The global model's floating tensors, flattened in logical order (copies where memory is channels-last)."""
        return [t.flatten() for t in self.globals]

    def receive(self, upload_bytes):
        """Decode one upload and add it to this round's sums; returns None, or why it was rejected."""
        try:
            num_samples, positions, values = codec.decode(upload_bytes, self.numels)
        except codec.PayloadError as e:
            return f"malformed payload ({e})"
        if num_samples == 0:
            return "claims 0 training examples, so it has no weight"
        if not all(torch.isfinite(v).all() for v in values):
            return "holds NaN or Inf"
        device = self.globals[0].device
        for weighted_sum, weight, kept, value in zip(self.weighted_sums, self.weights, positions, values):
            value = value.to(device, torch.float64) * num_samples
            if kept is None:
                weighted_sum += value
                weight += num_samples
            else:
                kept = kept.to(device)
                weighted_sum.index_add_(0, kept, value)
                weight.index_add_(0, kept, torch.full_like(value, num_samples))
        self.total_weight += num_samples
        self.accepted += 1
        self.received_entries += sum(len(v) for v in values)
        return None

    @torch.no_grad()
    def aggregate(self):
        """Move the global model by this round's accepted uploads under the configured rule, then start afresh.

        Returns None when the model moved, or why it was kept as it was: no upload was accepted, or the step would have
        made the global model (or the server momentum) non-finite."""
        problem = self._step() if self.accepted else "no upload was accepted"
        self._start_round()
        return problem

    def _step(self):
        updates = [self._update(s, w).float() for s, w in zip(self.weighted_sums, self.weights)]
        velocity = None
        if self.conf["server_momentum"]:
            beta = self.conf["server_momentum"]
            velocity = updates if self.velocity is None else [beta * v + u for v, u in zip(self.velocity, updates)]
            updates = velocity
        stepped = [g + u.view(g.shape) for g, u in zip(self.globals, updates)]
        if not all(torch.isfinite(t).all() for t in stepped + (velocity or [])):
            return "the aggregate would make the global model non-finite, so the model was kept"
        for global_tensor, new in zip(self.globals, stepped):
            global_tensor.copy_(new)
        if velocity is not None:
            self.velocity = velocity
        return None

    def _update(self, weighted_sum, weight):
        rule = self.conf["aggregation"]
        if rule == "masked_mean":  # per entry, over the clients that sent it; unsent entries do not move
            return torch.where(weight > 0, weighted_sum / weight.clamp(min=1e-12), 0.0)
        mean = weighted_sum / self.total_weight  # unsent entries count as zero
        if rule == "mean":
            return mean
        # the chapter's global += lambda * sum(diffs), each diff weighted by its client's share of the samples
        return self.conf["lambda"] * self.accepted * mean

    @torch.no_grad()
    def evaluate(self, images, labels):
        """(accuracy, mean cross-entropy) of the global model on a split."""
        self.model.eval()
        correct, loss_sum = 0, 0.0
        for start in range(0, len(labels), EVAL_BATCH_SIZE):
            logits = self.model(images[start:start + EVAL_BATCH_SIZE])
            target = labels[start:start + EVAL_BATCH_SIZE]
            loss_sum += F.cross_entropy(logits, target, reduction="sum")
            correct += (logits.argmax(1) == target).sum()
        return float(correct) / len(labels), float(loss_sum) / len(labels)
