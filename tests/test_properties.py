"""Property tests of the codec (hypothesis): for every method, random shapes, densities, values and seeds, the
receiver decodes exactly what the sender's encoder says it reconstructs; every byte of a payload counts (any prefix,
or one byte more, is refused); and a receiver of another method or parameters refuses it. Derandomized, so that CI runs
the same examples every time; the fuzz harness (fuzz/) searches further."""
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import codec
from utils import config

SETTINGS = settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def uploads(draw):
    """(the run's config, the diffs' shapes, the diffs, num_samples, mask seed, rounding seed)."""
    shapes = draw(st.lists(st.one_of(st.tuples(st.integers(1, 40)), st.tuples(st.integers(1, 12), st.integers(1, 30))),
                           min_size=1, max_size=4))
    conf = config.validate({
        "sparsifier": draw(st.sampled_from(list(codec.SPARSIFIERS))),
        "quantize": draw(st.sampled_from(list(codec.QUANTIZERS))),
        "prop": draw(st.sampled_from([0.0, 0.01, 0.1, 0.37, 0.5, 1.0])),
        "topk_scope": draw(st.sampled_from(["tensor", "model"])),
        "topk_share": draw(st.sampled_from([0.0, 0.5, 1.0])),
        "levels": draw(st.sampled_from([1, 4, 255, 65535])),
        "bucket_size": draw(st.sampled_from([1, 7, 512])),
        "rank": draw(st.integers(1, 3)),
    })
    seed = draw(st.integers(0, 2**32))
    generator = torch.Generator().manual_seed(seed)
    scale = draw(st.sampled_from([0.0, 1e-30, 1.0, 1e30]))
    diffs = [torch.randn(math.prod(shape), generator=generator) * scale for shape in shapes]
    return conf, [torch.Size(shape) for shape in shapes], diffs, draw(st.integers(0, 2**32 - 1)), seed, seed + 1


@SETTINGS
@given(uploads())
def test_the_receiver_decodes_what_the_encoder_says_it_reconstructs(upload):
    conf, shapes, diffs, num_samples, mask_seed, rounding_seed = upload
    encoded = codec.encode(conf, diffs, num_samples, mask_seed, rounding_seed, shapes)
    claimed, positions, values = codec.decode(encoded.payload, [shape.numel() for shape in shapes], conf)
    assert claimed == num_samples
    for sent, got, numel in zip(encoded.positions, positions, [shape.numel() for shape in shapes]):
        assert (sent is None and got is None) or torch.equal(sent.cpu(), got)
    for sent, got in zip(encoded.values, values):  # bit for bit, NaN and Inf included
        assert sent.dtype == got.dtype == torch.float32 and torch.equal(sent.view(torch.int32), got.view(torch.int32))


@SETTINGS
@given(uploads(), st.data())
def test_every_byte_counts(upload, data):
    conf, shapes, diffs, num_samples, mask_seed, rounding_seed = upload
    payload = codec.encode(conf, diffs, num_samples, mask_seed, rounding_seed, shapes).payload
    numels = [shape.numel() for shape in shapes]
    cut = data.draw(st.integers(0, len(payload) - 1))
    with pytest.raises(codec.PayloadError):
        codec.decode(payload[:cut], numels, conf)
    with pytest.raises(codec.PayloadError):
        codec.decode(payload + bytes([data.draw(st.integers(0, 255))]), numels, conf)


@SETTINGS
@given(uploads(), st.sampled_from(["sparsifier", "quantize", "prop", "levels", "bucket_size", "rank"]))
def test_a_receiver_of_another_method_refuses_it(upload, key):
    conf, shapes, diffs, num_samples, mask_seed, rounding_seed = upload
    payload = codec.encode(conf, diffs, num_samples, mask_seed, rounding_seed, shapes).payload
    other = {"sparsifier": {"random": "topk"}.get(conf["sparsifier"], "random"),
             "quantize": {"none": "f16"}.get(conf["quantize"], "none"), "prop": conf["prop"] / 2 + 0.25,
             "levels": conf["levels"] % 65535 + 1, "bucket_size": conf["bucket_size"] + 1, "rank": conf["rank"] + 1}
    receiver = {**conf, key: other[key]}
    numels = [shape.numel() for shape in shapes]
    if receiver == conf or not carries(conf, key, numels, receiver):
        return  # that key is not on this method's wire, or does not change what it sends
    with pytest.raises(codec.PayloadError, match="where this run's"):
        codec.decode(payload, numels, receiver)


def carries(conf, key, numels, receiver):
    """Whether a payload of `conf`'s method shows `key`: its method, or a parameter its header or counts depend on."""
    if key in ("sparsifier", "quantize"):
        return True
    if key in ("levels", "bucket_size"):
        return conf["quantize"] == "qsgd"
    if key == "rank":
        return conf["sparsifier"] == "powersgd"
    if conf["sparsifier"] == "topk":
        return codec.sparsifiers.topk_count(conf["prop"], numels, conf["topk_scope"]) != \
            codec.sparsifiers.topk_count(receiver["prop"], numels, conf["topk_scope"])
    if conf["sparsifier"] == "hybrid":
        return counts_of_hybrid(conf, numels) != counts_of_hybrid(receiver, numels)
    return conf["sparsifier"] == "random"


def counts_of_hybrid(conf, numels):
    top = codec.sparsifiers.topk_count(conf["topk_share"] * conf["prop"], numels, conf["topk_scope"])
    return top, codec.sparsifiers.Hybrid.random_count(conf["prop"], numels, top)
