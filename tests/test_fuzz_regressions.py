"""The fuzz target (fuzz/fuzz_target.py) in CI: on a ResNet-18-sized model, every input kept in fuzz/regressions/
(what the harness found, once fixed), the honest seeds of every method and a few hundred damaged ones decode well or
are refused with PayloadError, each within MOST_BYTES of peak memory (time is the harness's to bound: this machine is
shared)."""
import os
import random
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "fuzz"))
import fuzz_target  # noqa: E402

REGRESSIONS = os.path.join(ROOT, "fuzz", "regressions")


@pytest.fixture(scope="module")
def seeds():
    return fuzz_target.seeds()


def test_what_the_fuzzer_found_is_fixed():
    for name in sorted(set(os.listdir(REGRESSIONS)) - {"README.md"}):
        with open(os.path.join(REGRESSIONS, name), "rb") as f:
            fuzz_target.check(f.read(), most_seconds=None)


def test_every_methods_honest_payload_decodes_within_the_bounds(seeds):
    assert len(seeds) == len(fuzz_target.RUNS) + 3
    for name, data in seeds.items():
        fuzz_target.check(data, most_seconds=None)


def test_damaged_payloads_are_refused_or_decode_within_the_bounds(seeds):
    """Bits flipped, bytes cut, inserted or overwritten with extremes, from a seeded stream: what a fuzzer tries
    first, without its coverage guidance."""
    draw = random.Random(0)
    inputs = list(seeds.values())
    for _ in range(300):
        data = bytearray(draw.choice(inputs))
        for _ in range(draw.randint(1, 4)):
            at = draw.randrange(len(data))
            how = draw.randrange(4)
            if how == 0:
                data[at] ^= 1 << draw.randrange(8)
            elif how == 1:
                del data[at:at + draw.randint(1, 64)]
            elif how == 2:
                data[at:at] = bytes(draw.randrange(256) for _ in range(draw.randint(1, 8)))
            else:
                data[at:at + 4] = draw.choice([b"\xff\xff\xff\xff", b"\0\0\0\0", b"\x00\x00\x80\x7f"])
        fuzz_target.check(bytes(data), most_seconds=None)
