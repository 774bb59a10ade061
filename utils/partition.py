"""Splitting the training set into the server's validation slice and disjoint client shares: iid, dirichlet (label
skew), shards (few labels each) or natural (the clients the data names for its examples)."""
import numpy as np
import torch

from utils.seeding import generator


class PartitionError(ValueError):
    """The data cannot be split as asked (for instance, fewer examples than clients)."""


def server_and_clients(dataset, conf):
    """(the server's validation slice, the clients' shares) of `dataset`'s training examples: `server_validation`
    examples drawn at random (seeded) for the server's own decisions, and the rest split by `split`, or as the data
    names its clients (partition 'natural'); every index tensor is CPU int64, sorted for the slice."""
    labels, held = dataset.train_labels.cpu(), conf["server_validation"]
    if held and len(labels) - held < conf["no_models"]:
        raise PartitionError(f"server_validation {held} leaves {max(0, len(labels) - held)} of the {len(labels)} "
                             f"training examples for {conf['no_models']} clients: lower it")
    order = torch.randperm(len(labels), generator=generator(conf["seed"], "server validation"))
    validation, rest = order[:held].sort().values, order[held:].sort().values
    if conf["partition"] == "natural":
        return validation, natural(dataset.train_clients, conf["no_models"], validation)
    if held == 0:
        return validation, split(labels, conf)
    return validation, [rest[share] for share in split(labels[rest], conf)]


def split(labels, conf):
    """A list of `no_models` CPU int64 index tensors: disjoint, each non-empty, seeded by conf['seed']."""
    labels = labels.cpu()
    clients = conf["no_models"]
    if len(labels) < clients:
        raise PartitionError(f"{len(labels)} training examples cannot give each of {clients} clients one")
    draw = generator(conf["seed"], "partition")
    if conf["partition"] == "iid":
        return list(torch.randperm(len(labels), generator=draw).tensor_split(clients))
    if conf["partition"] == "dirichlet":
        return _dirichlet(labels, clients, conf["alpha"], draw)
    return _shards(labels, clients, conf["shards_per_client"], draw)


def natural(owners, clients, validation):
    """Each client's share: the examples the data names it for (client i: the i-th smallest id in train_clients),
    less those in the server's `validation` slice."""
    if owners is None:
        raise PartitionError("partition 'natural' needs data that names a client per training example (train_clients "
                             "in the dict of your own data, see docs/own-model-and-data.md)")
    named = int(owners.max()) + 1
    if named != clients:
        raise PartitionError(f"partition 'natural': the data names {named} clients; set no_models to {named}")
    kept = torch.ones(len(owners), dtype=torch.bool)
    kept[validation] = False
    shares = [share[kept[share]] for share in torch.argsort(owners, stable=True).split(
        torch.bincount(owners, minlength=clients).tolist())]
    empty = next((client for client, share in enumerate(shares) if len(share) == 0), None)
    if empty is not None:
        raise PartitionError(f"partition 'natural': server_validation leaves client {empty} no training example: lower "
                             f"it, or set it to 0")
    return shares


def _dirichlet(labels, clients, alpha, draw):
    """Each label's examples are dealt to clients in proportions drawn from Dirichlet(alpha)."""
    num_classes = int(labels.max()) + 1
    # numpy's sampler stays exact for tiny alpha, where normalizing Gamma draws underflows to 0/0
    numpy_draw = np.random.default_rng(int(torch.randint(2**62, (1,), generator=draw)))
    proportions = torch.from_numpy(numpy_draw.dirichlet(np.full(clients, alpha), size=num_classes))
    shares = [[] for _ in range(clients)]
    for label in range(num_classes):
        members = (labels == label).nonzero().squeeze(1)
        members = members[torch.randperm(len(members), generator=draw)]
        cuts = (proportions[label].cumsum(0) * len(members)).round().long().tolist()
        for client, part in enumerate(torch.tensor_split(members, cuts[:-1])):
            shares[client].append(part)
    shares = [torch.cat(parts) for parts in shares]
    _fill_empty(shares)
    return [share[torch.randperm(len(share), generator=draw)] for share in shares]


def _fill_empty(shares):
    """Give every empty share one example from the largest share, so no client is left without data."""
    for client, share in enumerate(shares):
        if len(share) == 0:
            donor = max(range(len(shares)), key=lambda c: len(shares[c]))
            shares[client], shares[donor] = shares[donor][-1:], shares[donor][:-1]


def _shards(labels, clients, shards_per_client, draw):
    """Each client holds `shards_per_client` distinct labels; each label's examples are split among its holders."""
    num_classes = int(labels.max()) + 1
    if shards_per_client > num_classes:
        raise PartitionError(f"shards_per_client={shards_per_client} exceeds the {num_classes} labels in the data")
    order = torch.randperm(num_classes, generator=draw).tolist()
    # consecutive slots of a label cycle give distinct labels to a client and spread labels evenly over clients
    held = [[order[(c * shards_per_client + j) % num_classes] for j in range(shards_per_client)]
            for c in range(clients)]
    holders = {label: [c for c in range(clients) if label in held[c]] for label in range(num_classes)}
    parts = [[] for _ in range(clients)]
    for label, owners in holders.items():
        if not owners:
            continue
        members = (labels == label).nonzero().squeeze(1)
        if len(members) < len(owners):
            raise PartitionError(f"label {label} has {len(members)} examples for {len(owners)} clients")
        members = members[torch.randperm(len(members), generator=draw)]
        for owner, part in zip(owners, members.tensor_split(len(owners))):
            parts[owner].append(part)
    return [torch.cat(p)[torch.randperm(sum(map(len, p)), generator=draw)] for p in parts]


def summary(shares, labels):
    """One line: client sizes (min/median/max) and the mean number of labels per client."""
    labels = labels.cpu()
    sizes = sorted(len(s) for s in shares)
    classes = sum(len(labels[s].unique()) for s in shares) / len(shares)
    median = sizes[len(sizes) // 2] if len(sizes) % 2 else (sizes[len(sizes) // 2 - 1] + sizes[len(sizes) // 2]) / 2
    return (f"{len(shares)} clients, examples per client min {sizes[0]} / median {median:g} / max {sizes[-1]}, "
            f"{classes:.1f} labels per client on average")
