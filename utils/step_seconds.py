"""Measure `step_seconds` for the simulated clock: the seconds of one local SGD step of a model on this machine.

    python -m utils.step_seconds [--model cnn] [--type fashion-mnist] [--batch-size 32] [--threads N] [--steps 200]

It trains the model on random inputs of the dataset's shape (the data's values do not change a step's cost), drops
the first steps (allocation, caches), and prints the median of the rest. Give the result to a run as
`--set step_seconds=...`: the clock then charges a client `steps * step_seconds * its slowness` for its training, and
never reads the host's time itself. This is the only place that does.
"""
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import datasets
import models
from utils import cli, user_code
from utils.config import KEYS

WARMUP = 20  # steps left out of the median


def shape_of(data_type):
    """(input shape, input dtype, classes) of a dataset: a built-in's from its table, without its files; synthetic's
    and a user's from the data itself."""
    if data_type in datasets.BUILTINS:
        builtin = datasets.BUILTINS[data_type]
        return builtin.input_shape, torch.float32, builtin.num_classes
    data = datasets.load(data_type, "unused", "cpu")
    return data.input_shape, data.train_inputs.dtype, data.num_classes


def measure(model_name, data_type, batch_size, steps, threads=None):
    """The median seconds of one SGD step (forward, backward, update) over `steps` timed steps."""
    if threads:
        torch.set_num_threads(threads)
    input_shape, dtype, classes = shape_of(data_type)
    torch.manual_seed(0)
    model = models.build(model_name, input_shape, classes, input_dtype=dtype)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    inputs = torch.rand(batch_size, *input_shape) if dtype.is_floating_point else torch.zeros(batch_size, *input_shape,
                                                                                             dtype=dtype)
    inputs = models.channels_last(inputs)
    labels = torch.randint(classes, (batch_size,))
    seconds = []
    for step in range(WARMUP + steps):
        started = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(inputs), labels).backward()
        optimizer.step()
        if step >= WARMUP:
            seconds.append(time.perf_counter() - started)
    return statistics.median(seconds)


def main(argv=None):
    parser = cli.ArgumentParser(__doc__)
    parser.add_argument("--model", default=KEYS["model_name"][0], help="a model_name (default: the config's)")
    parser.add_argument("--type", default=KEYS["type"][0],
                        help="the dataset whose input shape to train on: a built-in or package.module:function")
    parser.add_argument("--batch-size", type=int, default=KEYS["batch_size"][0])
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's, this machine's cores)")
    parser.add_argument("--steps", type=int, default=200, help="timed steps (after 20 left out)")
    args = parser.parse_args(argv)
    if not (1 <= args.batch_size <= 4096 and 1 <= args.steps <= 100_000 and 1 <= (args.threads or 1) <= 1024):
        print("error: --batch-size must be 1 to 4096, --steps 1 to 100000, --threads 1 to 1024", file=sys.stderr)
        return 2
    try:
        models.check_name(args.model)
        datasets.check_name(args.type)
        if args.type not in (*datasets.BUILTINS, "synthetic") and not user_code.is_spec(args.type):
            parser.error(f"unknown --type {args.type} (choose from {', '.join([*datasets.BUILTINS, 'synthetic'])}, "
                         f"or package.module:function)")
        seconds = measure(args.model, args.type, args.batch_size, args.steps, args.threads)
    except (models.ModelError, datasets.DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{seconds:.6g}  # step_seconds: {args.model}, {args.type} inputs, batch {args.batch_size}, "
          f"{torch.get_num_threads()} threads, median of {args.steps} steps")
    return 0


if __name__ == "__main__":
    sys.exit(main())
