"""client.py: mask seeds, top-k selection, error feedback, and local training's upload."""
import copy
import math

import pytest
import torch

import codec
import models
from client import Client
from codec.sparsifiers import topk_positions
from conftest import dense_from
from utils.seeding import derive_seed, seed_torch


def flat_float_state(model):
    return [t.detach().clone().flatten() for t in model.state_dict().values() if torch.is_floating_point(t)]


def decoded_dense(encoded, numels):
    """The diff the server reconstructs from an upload, as dense flat tensors (zeros where nothing was sent)."""
    _, positions, values = codec.decode(encoded, numels)
    return dense_from(positions, values, numels), positions


def perturbed(model, seed, scale=0.1):
    """A copy of `model` with every floating tensor moved by seeded noise (a stand-in for local training)."""
    local = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in local.state_dict().values():
            if torch.is_floating_point(tensor):
                tensor.add_(scale * torch.randn(tensor.shape, generator=g))
    return local


# ---- mask seeds ------------------------------------------------------------------------------------------------

def test_fixed_mask_is_the_same_every_round(make_conf):
    conf = make_conf(mask="fixed")
    client = Client(3, torch.arange(10), conf)
    seeds = {client.mask_seed(r) for r in range(1, 6)}
    assert len(seeds) == 1
    # another client's fixed mask differs; a fresh object for the same client regenerates the same seed
    assert Client(2, torch.arange(10), conf).mask_seed(1) not in seeds
    assert Client(3, torch.arange(10), conf).mask_seed(9) in seeds


def test_round_mask_differs_between_rounds(make_conf):
    client = Client(3, torch.arange(10), make_conf(mask="round"))
    seeds = [client.mask_seed(r) for r in range(1, 6)]
    assert len(set(seeds)) == 5
    assert Client(3, torch.arange(10), make_conf(mask="round")).mask_seed(4) == seeds[3]


def test_seed_changes_masks(make_conf):
    a = Client(0, torch.arange(10), make_conf(seed=0)).mask_seed(1)
    b = Client(0, torch.arange(10), make_conf(seed=1)).mask_seed(1)
    assert a != b


@pytest.mark.parametrize("mask", ["fixed", "round"])
def test_uploaded_positions_follow_the_mask_seed(make_conf, mask):
    conf = make_conf(mask=mask, prop=0.4, sparsifier="random")
    model = models.build("cnn", (1, 16, 16), 10)
    numels = [t.numel() for t in flat_float_state(model)]
    local = perturbed(model, 1)
    client = Client(1, torch.arange(50), conf)
    per_round = []
    for round_index in (1, 2):
        upload = client._upload(local, model.state_dict(), round_index, 0.0)
        _, positions = decoded_dense(upload.payload, numels)
        expected = codec.sparsifiers.random_positions(client.mask_seed(round_index), 0.4, numels)
        assert all(torch.equal(p, e) for p, e in zip(positions, expected))
        per_round.append(positions)
    same = all(torch.equal(a, b) for a, b in zip(*per_round))
    assert same == (mask == "fixed")


# ---- top-k -----------------------------------------------------------------------------------------------------

def reference_topk(values, count):
    """Positions of the `count` largest |values| by a full sort, as a sorted list."""
    order = sorted(range(len(values)), key=lambda i: -abs(values[i]))
    return sorted(order[:count])


@pytest.mark.parametrize("prop", [0.0, 0.01, 0.25, 0.5, 0.6, 1.0])
def test_topk_per_tensor(prop):
    g = torch.Generator().manual_seed(11)
    diffs = [torch.randn(n, generator=g) for n in (10, 7, 1000, 1)]
    chosen = topk_positions(diffs, prop, "tensor")
    for d, kept in zip(diffs, chosen):
        count = math.ceil(prop * d.numel())
        assert len(kept) == count
        assert kept.tolist() == reference_topk(d.tolist(), count)


@pytest.mark.parametrize("prop, numel, count", [(0.07, 100, 7), (0.29, 100, 29), (0.01, 1, 1), (0.011, 1000, 11)])
def test_topk_count_ignores_float_noise(prop, numel, count):  # 0.07 * 100 == 7.000000000000001 in floats
    diff = torch.arange(numel, dtype=torch.float32)
    assert len(topk_positions([diff], prop, "tensor")[0]) == count


@pytest.mark.parametrize("prop", [0.0, 0.01, 0.1, 0.5, 1.0])
def test_topk_over_the_whole_model(prop):
    g = torch.Generator().manual_seed(12)
    # tensors of very different scales, so the model-wide top-k is unevenly spread over them
    diffs = [torch.randn(50, generator=g) * 10, torch.randn(300, generator=g), torch.randn(5, generator=g) * 0.01,
             torch.randn(200, generator=g) * 3]
    chosen = topk_positions(diffs, prop, "model")
    flat = torch.cat(diffs).tolist()
    expected = reference_topk(flat, math.ceil(prop * len(flat)))
    offsets = [0]
    for d in diffs:
        offsets.append(offsets[-1] + d.numel())
    got = []
    for kept, start, d in zip(chosen, offsets, diffs):
        assert kept.dtype == torch.int64
        if len(kept):
            assert kept.min() >= 0 and kept.max() < d.numel()
            assert torch.all(kept[1:] > kept[:-1])
        got += [start + i for i in kept.tolist()]
    assert got == expected
    if prop == 0.1:  # the per-model choice really differs from the per-tensor one here
        assert [len(k) for k in chosen] != [len(k) for k in topk_positions(diffs, prop, "tensor")]


def test_topk_with_ties_keeps_count_and_threshold():
    d = torch.tensor([1.0, -3.0, 3.0, 2.0, -2.0, 2.0, 0.0, 3.0])
    kept = topk_positions([d], 0.5, "tensor")[0]  # 4 of 8: the three |3|s and one of the |2|s
    assert len(kept) == 4
    assert sorted(d[kept].abs().tolist()) == [2.0, 3.0, 3.0, 3.0]


def test_client_topk_upload_sends_the_largest_entries(make_conf, tiny_model):
    conf = make_conf(sparsifier="topk", prop=0.5)
    local = copy.deepcopy(tiny_model)
    with torch.no_grad():  # diffs by hand: weight diff [0.1, -5, 0.2, 3, -0.3, 4], bias diff [-1, 0.5]
        local.weight.add_(torch.tensor([[0.1, -5.0, 0.2], [3.0, -0.3, 4.0]]))
        local.bias.add_(torch.tensor([-1.0, 0.5]))
    upload = Client(0, torch.arange(7), conf)._upload(local, tiny_model.state_dict(), 1, 0.0)
    num_samples, positions, values = codec.decode(upload.payload, [6, 2])
    assert num_samples == 7
    assert positions[0].tolist() == [1, 3, 5] and positions[1].tolist() == [0]
    assert torch.allclose(values[0], torch.tensor([-5.0, 3.0, 4.0]))
    assert torch.allclose(values[1], torch.tensor([-1.0]))


# ---- error feedback --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sparsifier, quantize, prop, decay", [
    ("topk", "none", 0.1, 1.0), ("random", "none", 0.3, 1.0), ("none", "none", 1.0, 1.0), ("topk", "none", 0.1, 0.5),
    ("random", "none", 0.3, 0.0), ("topk", "int8", 0.1, 1.0), ("topk", "ternary", 0.05, 1.0),
    ("none", "sign", 1.0, 1.0), ("random", "f16", 0.3, 1.0), ("none", "int8", 1.0, 0.5), ("powersgd", "none", 1.0, 1.0),
    ("powersgd", "int8", 1.0, 0.5)])
def test_error_feedback_conserves_mass(make_conf, sparsifier, quantize, prop, decay):
    """received + residual / decay == diff + old residual: whatever the server does not reconstruct (unsent entries,
    quantization error) is kept, scaled by residual_decay."""
    conf = make_conf(sparsifier=sparsifier, quantize=quantize, prop=prop, error_feedback=True,
                     residual_decay=decay, mask="round", topk_scope="model" if quantize == "ternary" else "tensor")
    model = models.build("cnn", (1, 16, 16), 10)
    global_flat = flat_float_state(model)
    numels = [t.numel() for t in global_flat]
    client = Client(0, torch.arange(20), conf)
    assert client.residual is None
    old_residual = [torch.zeros(n) for n in numels]
    lossless = sparsifier == "none" and quantize == "none"
    for round_index in (1, 2, 3):
        local = perturbed(model, round_index)
        diff = [l - g for l, g in zip(flat_float_state(local), global_flat)]
        upload = client._upload(local, model.state_dict(), round_index, 0.0)
        received, positions = decoded_dense(upload.payload, numels)
        new_residual = client.residual
        for s, r, d, old, kept in zip(received, new_residual, diff, old_residual, positions):
            if decay:
                assert torch.allclose(s + r / decay, d + old, atol=1e-5, rtol=0)
            if kept is not None and quantize == "none":
                assert torch.all(r[kept] == 0)  # what was sent exactly leaves the residual
        if lossless or decay == 0:
            assert all(torch.all(r == 0) for r in new_residual)
        else:
            assert sum(float(r.abs().sum()) for r in new_residual) > 0
        old_residual = [r.clone() for r in new_residual]


def test_error_feedback_changes_what_is_sent(make_conf):
    """Round 2's topk upload with a residual carries diff + residual, not the bare diff."""
    model = models.build("cnn", (1, 16, 16), 10)
    numels = [t.numel() for t in flat_float_state(model)]
    uploads = {}
    for ef in (False, True):
        client = Client(0, torch.arange(20), make_conf(sparsifier="topk", prop=0.05, error_feedback=ef))
        client._upload(perturbed(model, 1), model.state_dict(), 1, 0.0)
        assert (client.residual is None) == (not ef)
        uploads[ef] = client._upload(perturbed(model, 2), model.state_dict(), 2, 0.0).payload
    assert uploads[False] != uploads[True]
    plain, _ = decoded_dense(uploads[False], numels)
    diff2 = [l - g for l, g in zip(flat_float_state(perturbed(model, 2)), flat_float_state(model))]
    kept = topk_positions(diff2, 0.05)
    assert all(torch.equal(p[k], d[k]) for p, k, d in zip(plain, kept, diff2))


def test_error_feedback_through_local_train(make_conf, synthetic):
    conf = make_conf(sparsifier="topk", prop=0.05, error_feedback=True)
    server_model = models.build("cnn", synthetic.input_shape, synthetic.num_classes)
    workspace = copy.deepcopy(server_model)
    global_state = server_model.state_dict()
    global_flat = flat_float_state(server_model)
    numels = [t.numel() for t in global_flat]
    client = Client(0, torch.arange(200), conf)
    old_residual = [torch.zeros(n) for n in numels]
    for round_index in (1, 2):
        upload = client.local_train(workspace, global_state, synthetic, round_index)
        diff = [l - g for l, g in zip(flat_float_state(workspace), global_flat)]
        sent, _ = decoded_dense(upload.payload, numels)
        for s, r, d, old in zip(sent, client.residual, diff, old_residual):
            assert torch.allclose(s + r, d + old, atol=1e-6, rtol=0)
        old_residual = [r.clone() for r in client.residual]


# ---- local training --------------------------------------------------------------------------------------------

def test_local_train_upload(make_conf, synthetic):
    conf = make_conf(sparsifier="none", lr=0.05, batch_size=32)
    model = models.build("cnn", synthetic.input_shape, synthetic.num_classes)
    global_state = {k: v.clone() for k, v in model.state_dict().items()}
    indices = torch.arange(100, 300)
    steps = []
    upload = Client(5, indices, conf).local_train(copy.deepcopy(model), global_state, synthetic, 1,
                                                  progress=lambda step, total: steps.append((step, total)))
    assert upload.client_id == 5
    assert steps[-1] == (7, 7) and [s for s, _ in steps] == list(range(1, 8))  # ceil(200 / 32) steps
    assert 0 < upload.train_loss < 10 and math.isfinite(upload.train_loss)
    numels = [t.numel() for t in flat_float_state(model)]
    num_samples, positions, values = codec.decode(upload.payload, numels)
    assert num_samples == 200 and positions == [None] * len(numels)
    assert any(float(v.abs().max()) > 0 for v in values)  # training moved the weights
    # the global state handed in is not modified, and the same call again gives the same bytes
    assert all(torch.equal(model.state_dict()[k], v) for k, v in global_state.items())
    again = Client(5, indices, conf).local_train(copy.deepcopy(model), global_state, synthetic, 1)
    assert again.payload == upload.payload
    other_round = Client(5, indices, conf).local_train(copy.deepcopy(model), global_state, synthetic, 2)
    assert other_round.payload != upload.payload  # another round shuffles differently


def test_local_train_lowers_loss_on_own_data(make_conf, synthetic):
    conf = make_conf(sparsifier="none", lr=0.05, local_epochs=3)
    model = models.build("cnn", synthetic.input_shape, synthetic.num_classes)
    indices = torch.arange(300)
    images, labels = synthetic.train_inputs[indices], synthetic.train_labels[indices]

    def loss_of(m):
        with torch.no_grad():
            return float(torch.nn.functional.cross_entropy(m(images), labels))
    workspace = copy.deepcopy(model)
    before = loss_of(model)
    Client(0, indices, conf).local_train(workspace, model.state_dict(), synthetic, 1)
    assert loss_of(workspace) < before - 0.1


def test_a_clients_dropout_is_seeded_as_torch_manual_seed_seeds_it():
    """seed_torch skips torch.manual_seed's queued seeding of a CUDA not started; what dropout draws is the same."""
    seed_torch(3, "dropout", 2, 7)
    ours = torch.nn.functional.dropout(torch.ones(256), 0.5)
    torch.manual_seed(derive_seed(3, "dropout", 2, 7))
    assert torch.equal(ours, torch.nn.functional.dropout(torch.ones(256), 0.5))
    torch.manual_seed(derive_seed(3, "dropout", 2, 8))  # another client
    assert 0 < ours.count_nonzero() < 256 and not torch.equal(ours, torch.nn.functional.dropout(torch.ones(256), 0.5))
