"""The server: owns the global model, decodes uploads into running sums, applies the aggregation rule, moves the model
by what its download method broadcasts, keeps the clients in sync with it (downloads.py), evaluates.

A client under a relay or compressed download runs this same class around its own copy of the model (a replica), so
that it moves exactly as the server's does."""
import torch
import torch.nn.functional as F

import codec
import downloads
import privacy
import robust
import secure

EVAL_BATCH_SIZE = 256  # on a CPU, larger batches fall out of cache and run slower per image


class Server:
    def __init__(self, model, conf, device, registered=None, validation=None):
        self.model = model.to(device)
        self.conf = conf
        # per client, the examples its share holds, known from enrollment: the most an upload of it may claim (None in
        # a replica: the uploads it replays carry the counts the server used)
        self.registered = registered
        self.method = conf  # what receive decodes: an upload of another method or parameters is refused unread
        # (images, labels) the server holds for its own decisions, never the test split; None: it holds no data
        self.validation = validation
        # the global model's floating tensors, in the order uploads carry them (flattened, in logical order)
        self.globals = [t for t in self.model.state_dict().values() if torch.is_floating_point(t)]
        self.numels = [t.numel() for t in self.globals]
        # a defense, DP's clipping or secure aggregation's field looks at the round's uploads together
        self.keeps_uploads = conf["defense"] != "none" or privacy.enabled(conf) or conf["secure_aggregation"]
        self.overflows = 0  # under secure aggregation: the entries of the last round's sum that wrapped
        self.velocity = None  # server momentum buffer, created on first use
        self.undo = None  # what roll_back restores: the global tensors and the momentum before the last move
        self.download = downloads.METHODS[conf["download"]](conf, [t.shape for t in self.globals])  # what it broadcasts
        self.syncs = downloads.Syncs(conf, self.numels, device)  # what each client holds and downloads
        self._start_round()

    def _start_round(self):
        # float64 sums: n_i * value cannot overflow them (f32 values times counts below 2^32 stay far below 1e308)
        self.weighted_sums = [t.new_zeros(t.numel(), dtype=torch.float64) for t in self.globals]  # sum of n_i * diff_i
        self.weights = [t.new_zeros(t.numel(), dtype=torch.float64) for t in self.globals]  # sum of n_i that sent it
        self.total_weight = 0  # sum of n_i over accepted uploads
        self.accepted = 0
        self.received_entries = 0  # diff entries carried by accepted uploads
        self.accepted_payloads = []  # (payload, the count it was weighed by) per accepted upload: what a relay forwards
        self.uploads = []  # with a defense: the round's decoded uploads, which it looks at together before summing
        self.delivered = None  # under secure aggregation run by the transport: the round's sums, as it delivered them

    def global_state(self):
        return self.model.state_dict()

    def flat_globals(self):
        """The global model's floating tensors, flattened in logical order (copies where memory is channels-last)."""
        return [t.flatten() for t in self.globals]

    def receive(self, upload_bytes, client_id=None, scale=1.0):
        """Decode one upload of `client_id` into this round's sums (with a defense: keep it for the step); returns None,
        or why it was rejected. Its claimed example count weighs it, cut to the client's registered count: a client
        may lower its weight, never raise it above its share's. Its values are multiplied by `scale` (FedBuff's
        staleness weight; 1 in a synchronous round)."""
        try:
            claimed, positions, values = codec.decode(upload_bytes, self.numels, self.method)
        except codec.PayloadError as e:
            return f"malformed payload ({e})"
        if claimed == 0:
            return "claims 0 training examples, so it has no weight"
        if not codec.all_finite(values):
            return "holds NaN or Inf"
        num_samples = claimed if self.registered is None else min(claimed, self.registered[client_id])
        device = self.globals[0].device
        values = [value.to(device, torch.float64) for value in values]
        if scale != 1.0:
            values = [value.mul_(scale) for value in values]
        upload = robust.Decoded(num_samples, [None if kept is None else kept.to(device) for kept in positions], values)
        if self.keeps_uploads:
            self.uploads.append(upload)
        else:
            self._add(upload)
        self.accepted += 1
        self.accepted_payloads.append((upload_bytes, num_samples))
        self.received_entries += sum(len(v) for v in values)
        return None

    def receive_sum(self, summed, clients, round_index):
        """Take the round's sums as a secure aggregation protocol run by the transport delivered them (secure.delivered:
        what the server would have summed of the uploads of `clients` clients), in place of their uploads."""
        device = self.globals[0].device
        sums, weights, total_weight, overflows = summed
        self.delivered = [s.to(device) for s in sums], [w.to(device) for w in weights], total_weight, overflows
        self.accepted = clients
        self.received_entries = clients * secure.movable_entries(self.conf, round_index, self.numels)

    def _add(self, upload):
        """Add a decoded upload to this round's sums, weighted by its example count."""
        for weighted_sum, weight, kept, value in zip(self.weighted_sums, self.weights, upload.positions, upload.values):
            value = value * upload.count
            if kept is None:
                weighted_sum += value
                weight += upload.count
            else:
                weighted_sum.index_add_(0, kept, value)
                weight.index_add_(0, kept, weight.new_tensor(upload.count).expand(len(kept)))
        self.total_weight += upload.count

    def sync(self, client_id):
        """The bytes `client_id` downloads to hold the global model now, and which kind of sync they are."""
        return self.syncs.sync(client_id, self.flat_globals)

    @torch.no_grad()
    def aggregate(self, round_index=0):
        """Move the global model by this round's accepted uploads under the configured rule, then start afresh.

        Returns None when the model moved, or why it stayed as it was: no upload was accepted, the step would have
        made the global model (or the server momentum) non-finite, or it changed no entry. After a move, `roll_back`
        can undo it until the next aggregate."""
        problem, message, changed = "no upload was accepted", None, None
        self.overflows = 0
        if self.accepted or privacy.enabled(self.conf):  # DP's noise is released even for a round without uploads
            update, velocity = self._step(round_index)
            moved, message = self.download.broadcast(update, self.accepted_payloads, round_index)
            before = [g.clone() for g in self.globals]
            problem, changed = self.move(moved, velocity or [])
            if changed is not None:
                self.undo = (before, self.velocity)
                self.download.commit()
                if velocity is not None:
                    self.velocity = velocity
                if not any(c.any() for c in changed):
                    problem = "the accepted uploads changed no entry of the global model"
        self.syncs.record(message if changed is not None else None, changed)
        self._start_round()
        return problem

    @torch.no_grad()
    def roll_back(self):
        """Undo the last aggregate's move: the model, the server momentum, the compressed download's residual and
        memory and the round's log entry become what a round that kept the model as it was leaves (its message is
        empty, so a client replaying the round stays in sync)."""
        before, self.velocity = self.undo
        for global_tensor, previous in zip(self.globals, before):
            global_tensor.copy_(previous)
        self.download.roll_back()
        self.syncs.roll_back()

    def _step(self, round_index):
        """The round's update under the defense and the aggregation rule, or DP's (with server momentum), and the
        momentum it leaves."""
        updates = [update.float() for update in self._updates(round_index)]
        velocity = None
        if self.conf["server_momentum"]:
            beta = self.conf["server_momentum"]
            velocity = updates if self.velocity is None else [beta * v + u for v, u in zip(self.velocity, updates)]
            updates = velocity
        return updates, velocity

    @torch.no_grad()
    def move(self, steps, also_finite=()):
        """Add `steps` (flat, one per tensor) to the global model unless that makes it, or `also_finite`, non-finite.
        Returns (None, per tensor which entries changed), or (why it stayed as it was, None)."""
        stepped = [g + u.view(g.shape) for g, u in zip(self.globals, steps)]
        if not codec.all_finite(stepped + list(also_finite)):
            return "the aggregate would make the global model non-finite, so the model was kept", None
        # compared bit for bit: -0.0 and 0.0 differ for a client that must hold the same bits
        changed = [new.flatten().view(torch.int32) != old.flatten().view(torch.int32)
                   for new, old in zip(stepped, self.globals)]
        for global_tensor, new in zip(self.globals, stepped):
            global_tensor.copy_(new)
        return None, changed

    @torch.no_grad()
    def overwrite(self, positions, values):
        """Set the global model's entries at `positions` (None: every entry) to `values`: a client's changed-entries or
        dense sync."""
        for global_tensor, kept, value in zip(self.globals, positions, values):
            flat = global_tensor.flatten().clone()  # logical order, whatever the memory format
            flat[slice(None) if kept is None else kept.to(flat.device)] = value.to(flat.device)
            global_tensor.copy_(flat.view(global_tensor.shape))

    def _updates(self, round_index):
        """Per tensor, the round's update in float64: DP-FedAvg's noisy mean, a robust statistic of the uploads, or the
        aggregation rule over the sums (of the uploads as norm_bound leaves them)."""
        self.uploads = secure.on_shared_mask(self.uploads, self.conf, round_index, self.numels)
        if self.conf["secure_aggregation"]:  # the server learns the sums only, as the protocol delivers them
            self.weighted_sums, self.weights, self.total_weight, self.overflows = self.delivered or secure.field_sums(
                self.uploads, self.numels, self.conf, self.globals[0].device)
            if privacy.enabled(self.conf):  # of updates the clients clipped, unweighted
                return privacy.noised(self.weighted_sums, self.conf, round_index)
            return [self._rule(s, w) for s, w in zip(self.weighted_sums, self.weights)]
        if privacy.enabled(self.conf):
            return privacy.noisy_mean(self.uploads, self.numels, self.conf, round_index, self.globals[0].device)
        defense = self.conf["defense"]
        if defense == "median":
            return robust.per_entry(self.uploads, self.numels, robust.median)
        if defense == "trimmed_mean":
            return robust.per_entry(self.uploads, self.numels, robust.trimmed(self.conf["trim_fraction"]))
        if defense == "geometric_median":
            return robust.geometric_median(self.uploads, self.numels)
        if defense == "norm_bound":
            for upload in robust.norm_bound(self.uploads, self.conf["clip_norm"], self.conf["clip_multiple"]):
                self._add(upload)
        return [self._rule(s, w) for s, w in zip(self.weighted_sums, self.weights)]

    def _rule(self, weighted_sum, weight):
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
