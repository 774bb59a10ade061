"""A coverage-guided fuzz harness (atheris, libFuzzer's engine for Python, as OSS-Fuzz runs parsers) over what the
server and a client read from the network: codec.decode (an upload, a round message, a node's kept state) and the
sync decoder (codec.decode_sync, then what downloads.apply_sync decodes of it), on a ResNet-18-sized model, for
every sparsifier and quantizer. Not run in CI; run it for as long as one likes:

    pip install atheris
    python fuzz/decode_fuzz.py -max_total_time=1800 -max_len=65536 fuzz/corpus      (30 minutes)

The first byte of an input picks what is decoded: even, an upload; odd, a sync. The rest is the payload. The run a
payload is decoded for is the one whose method its header names (the parameters below), as a server configured for
that method decodes it; whatever else the header names is decoded as an STC run would. A finding is any exception
but codec.PayloadError, a decode whose output is not what the model's tensors hold, or an input that raises the
process's peak memory by more than MOST_BYTES or takes more than MOST_SECONDS. libFuzzer writes it as crash-* in the
current folder; fixed, it goes into fuzz/regressions/, which tests/test_fuzz_regressions.py decodes in CI. An empty
corpus folder is seeded with honest payloads of every method first (fuzz_target.seeds).
"""
import inspect
import os
import sys
import types

import atheris
from atheris.instrument_bytecode import patch_code

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import codec  # noqa: E402
import fuzz_target  # noqa: E402
from codec import positions, quantizers, sparsifiers, wire  # noqa: E402


def instrument(module):
    """Give every function and method of `module` atheris's coverage of branches, without its tracing of comparisons
    (atheris.instrument_imports adds both): that tracing kept memory on every comparison of numpy arrays, 1.5 GB per
    hundred inputs, so that libFuzzer's memory limit ended a run within minutes."""
    for value in vars(module).values():
        for function in [value, *vars(value).values()] if inspect.isclass(value) else [value]:
            function = getattr(function, "__func__", function)  # a staticmethod's or classmethod's own function
            if isinstance(function, types.FunctionType) and function.__module__ == module.__name__:
                function.__code__ = patch_code(function.__code__, trace_dataflow=False)


def seed_corpus(folder):
    """Write fuzz_target.seeds() into `folder` if it is empty."""
    os.makedirs(folder, exist_ok=True)
    if os.listdir(folder):
        return
    for name, data in fuzz_target.seeds().items():
        with open(os.path.join(folder, name), "wb") as f:
            f.write(data)


def main():
    corpora = [arg for arg in sys.argv[1:] if not arg.startswith("-")]
    for folder in corpora:
        seed_corpus(folder)
    for module in (codec, wire, positions, sparsifiers, quantizers, fuzz_target):
        instrument(module)
    atheris.Setup(sys.argv, fuzz_target.check)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
