"""The fuzz target: decode one input as the server or a client would, and check what came out and what it cost.
fuzz/decode_fuzz.py drives it under atheris; tests/test_fuzz_regressions.py runs it on the inputs kept in
fuzz/regressions/ (and on random ones)."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

import codec  # noqa: E402
import models  # noqa: E402
from utils import config, measure  # noqa: E402

torch.set_num_threads(1)  # what MOST_SECONDS bounds is one thread's time

MOST_BYTES = 300e6  # the bound on what one decode may add to the server's peak memory
MOST_SECONDS = 1.0  # and on its time: CPU seconds, with one thread (torch's are set so), which a shared machine's
# other processes do not stretch as they stretch wall-clock time
MOST_ROUNDS = 8  # the rounds played before a fuzzed sync arrives

_model = models.build("resnet18", (3, 32, 32), 10)
SHAPES = [t.shape for t in _model.state_dict().values() if torch.is_floating_point(t)]
NUMELS = [shape.numel() for shape in SHAPES]
del _model

# per (sparsifier, quantizer): the run that decodes it, with small densities so honest payloads are small seeds
RUNS = {(sparsifier, quantizer): config.validate({
    "sparsifier": sparsifier, "quantize": quantizer, "prop": 0.001, "topk_scope": "model" if quantizer == "ternary"
    else "tensor", "topk_share": 0.5, "levels": 4, "bucket_size": 512, "rank": 2, "download": "relay"})
    for sparsifier in codec.SPARSIFIERS for quantizer in codec.QUANTIZERS}


def seeds():
    """name: input. Honest uploads of every method (cut to 64 kB, libFuzzer's length here) and a sync of each kind:
    starting points that already pass the headers."""
    diffs = [torch.randn(n, generator=torch.Generator().manual_seed(i)) for i, n in enumerate(NUMELS)]
    out = {f"upload-{sparsifier}-{quantizer}": b"\0" + codec.encode(run, diffs, 500, 1, 2, SHAPES).payload[:65535]
           for (sparsifier, quantizer), run in RUNS.items()}
    sparse = codec.encode(RUNS["topk", "ternary"], diffs, 500, 1, 2, SHAPES).payload
    out["sync-replay"] = b"\1" + codec.encode_sync(codec.REPLAY, [[sparse], [], [sparse, sparse]])
    positions = [torch.arange(0, n, 997) for n in NUMELS]
    out["sync-changed"] = b"\1" + codec.encode_sync(codec.CHANGED, codec.encode_entries(diffs, positions))
    out["sync-dense"] = b"\1" + codec.encode_sync(codec.DENSE, codec.encode(codec.DENSE_F32, diffs, 0).payload)[:65535]
    return out


class Finding(Exception):
    """An input that decoded to something the model does not hold, or cost more than the bounds."""


def run_for(payload):
    """The run whose method the payload's header names (an STC run where it names none)."""
    ids = tuple(payload[1:3]) if len(payload) >= 3 else ()
    names = (codec.SPARSIFIER_IDS[ids[0]].name, codec.QUANTIZER_IDS[ids[1]].name) if (
        len(ids) == 2 and ids[0] in codec.SPARSIFIER_IDS and ids[1] in codec.QUANTIZER_IDS) else ("topk", "ternary")
    return RUNS[names]


def check_decoded(decoded):
    _, positions, values = decoded
    for numel, kept, value in zip(NUMELS, positions, values, strict=True):
        expected = numel if kept is None else len(kept)
        if value.dtype != torch.float32 or value.shape != (expected,):
            raise Finding(f"{value.shape} {value.dtype} values for {expected} positions")
        if kept is not None and len(kept) and (kept[0] < 0 or kept[-1] >= numel or (kept.diff() <= 0).any()):
            raise Finding("positions out of range or not strictly increasing")


def decode_upload(payload):
    check_decoded(codec.decode(payload, NUMELS, run_for(payload)))


def decode_sync(sync):
    kind, content = codec.decode_sync(sync, MOST_ROUNDS)
    if kind == codec.REPLAY:
        for message in content:
            for payload in message:
                decode_upload(payload)
        return
    check_decoded(codec.decode(content, NUMELS, codec.DENSE_F32 if kind == codec.DENSE else codec.CHANGED_ENTRIES))


def check(data, most_seconds=MOST_SECONDS):
    """Raise for a finding; return for an input refused with PayloadError or decoded well within the bounds (no bound
    on time where `most_seconds` is None: tests on a busy machine)."""
    if not data:
        return
    work = decode_upload if data[0] % 2 == 0 else decode_sync
    outcome, grown, _, seconds = measure.cost(lambda: work(bytes(data[1:])))
    if grown > MOST_BYTES or (most_seconds is not None and seconds > most_seconds):
        raise Finding(f"the input cost +{grown / 1e6:.0f} MB and {seconds:.2f} s ({outcome!r:.200})")
    if isinstance(outcome, Exception) and not isinstance(outcome, codec.PayloadError):
        raise outcome
