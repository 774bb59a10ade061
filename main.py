"""fedsparse: federated averaging where clients upload and download only part of the model update, coded as bytes.

Run:     python main.py -c ./utils/conf.json [--set prop=0.5 ...] [--out DIR]
Resume:  python main.py --out DIR --resume          (continues an interrupted run to the same end)
Sweep:   python main.py -c ./utils/conf.json --sweep prop=1.0,0.8,0.5 [--out DIR]
Threads: python main.py -c ./utils/conf.json --parallel 2       (2 clients train at once, on a thread each)
Flower:  python main.py -c ./utils/conf.json --engine flower [--parallel 2]      (Flower's simulation engine)
         deploy/local.sh --nodes 10 -- -c ./utils/conf.json --out DIR          (a Flower deployment, on 127.0.0.1)

Each round: sample k clients; each downloads what brings its model to the server's (the dense model, or under a relay
or compressed download the cheapest of the rounds it missed, the changed entries or the dense model: downloads.py),
trains from it on its own data and uploads its weight diff, selected and coded by the compression method (codec/);
the server decodes and aggregates the uploads into the global model and evaluates it (federation.py runs the rounds).
One line per round is printed, and <out>/metrics.csv, <out>/config.json and <out>/checkpoint.pt are written. Bad input
is one line on stderr and exit status 2; Ctrl-C and SIGTERM keep every finished round and print the command that
continues (exit status 130 and 143).
"""
import argparse
import contextlib
import copy
import functools
import math
import os
import shlex
import signal
import sys
import threading
import time


class Terminated(KeyboardInterrupt):
    """SIGTERM, which a cluster scheduler sends before it preempts a job: handled exactly like Ctrl-C."""


def raise_terminated(signum, frame):
    raise Terminated


def exit_status(stop):
    return 128 + (signal.SIGTERM if isinstance(stop, Terminated) else signal.SIGINT)


if __name__ == "__main__":  # before the slow imports below, so that SIGTERM while they load is a clean stop too
    signal.signal(signal.SIGTERM, raise_terminated)
try:  # torch takes seconds to import: Ctrl-C meanwhile is a clean stop, not a traceback
    import torch

    import clock
    import datasets
    import engines
    import federation
    import models
    import privacy
    import secure
    from engines import inprocess
    from utils import allocator, config, partition, run_files, user_code
    from utils.run_files import RunError
except KeyboardInterrupt as stop:
    print("\ninterrupted while starting: nothing was saved", file=sys.stderr)
    sys.exit(exit_status(stop))

BAD_INPUT = (config.ConfigError, clock.ProfileError, datasets.DataError, models.ModelError, partition.PartitionError,
             privacy.PrivacyError, secure.SecureAggregationError, RunError)


def resolve(args):
    """(config, run folder) from the command line; a resumed run keeps the config it started with."""
    overrides = config.load(args.conf) if args.conf else {}
    for assignment in args.set:
        key, value = config.parse_assignment(assignment)
        overrides[key] = value
    conf, out = resumed_config(args, overrides) if args.resume else new_config(args, overrides)
    # fail before loading data or creating a folder
    run_files.check_writable(out)
    federation.pick_device(conf["device"])
    models.check_name(conf["model_name"])
    datasets.check_name(conf["type"])
    clock.check_profile(conf)
    privacy.check(conf)
    if args.engine != "inprocess" and (conflict := engines.check_secure_aggregation(conf)):
        raise RunError(conflict)
    if args.engine != "deployment":
        check_parallel(conf, args)
    return conf, out


def check_parallel(conf, args):
    """Refuse clients at once that could not train or would sit idle, before data loads or Ray starts."""
    if args.parallel > conf["k"]:  # each holds a model (a Ray actor: the data too); at most k clients train at once
        raise RunError(f"--parallel {args.parallel} is more than the {conf['k']} clients that train per round (k): "
                       f"give at most {conf['k']}")
    if args.engine == "inprocess":
        threads = args.parallel * engines.client_threads(args.parallel, args.client_cpus)
        if args.parallel > 1 and threads > cpus():  # more threads than CPUs only wait for each other, a model each
            raise RunError(f"--parallel {args.parallel} trains {args.parallel} clients at once on {threads} torch "
                           f"threads in all (--client-cpus), and this machine has {cpus()} CPUs: ask for at most "
                           f"{cpus()}")
        inprocess.check_device(args.parallel, federation.pick_device(conf["device"]))
        return
    gpus, present = engines.node_gpus(args.client_gpus, args.parallel), torch.cuda.device_count()
    if gpus > present:
        raise RunError(f"--client-gpus {args.client_gpus:g} with --parallel {args.parallel} needs {gpus} GPU(s); "
                       f"CUDA sees {present} here")


def new_config(args, overrides):
    if not args.conf:
        raise RunError("give a config with -c FILE (or --resume with --out DIR)")
    conf = config.validate(overrides)
    out = args.out or new_run_dir(conf)
    if run_files.holds_run(out):
        raise RunError(f"{out} already holds a run: continue it with --resume, or choose another --out")
    return conf, out


def resumed_config(args, overrides):
    if not args.out or not run_files.holds_run(args.out):
        raise RunError(f"nothing to resume: no checkpoint.pt in {args.out or '(give the run folder with --out)'}")
    try:
        saved = config.validate(run_files.read_config(args.out))
    except (OSError, ValueError) as e:  # ValueError includes JSON errors and ConfigError
        raise RunError(f"cannot resume {args.out}: its config.json is unreadable ({e})") from None
    conf = config.validate({**saved, **overrides} if not args.conf else overrides)
    changed = [key for key in conf if conf[key] != saved[key] and key != "global_epochs"]
    if changed:
        raise RunError(f"--resume: config differs from {args.out}/config.json in {', '.join(changed)}")
    if conf["global_epochs"] < saved["global_epochs"]:
        raise RunError(f"--resume: global_epochs may only be raised; {args.out} runs to "
                       f"{saved['global_epochs']} rounds, got {conf['global_epochs']}")
    return conf, args.out


def new_run_dir(conf):
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = os.path.join("runs", f"{stamp}-{conf['type']}-{conf['sparsifier']}-prop{conf['prop']:g}")
    path, n = base, 1
    while os.path.exists(path):
        n += 1
        path = f"{base}-{n}"
    return path


def plan(args):
    """The runs to do, as (config, folder, resume), and the command that continues them after a stop."""
    if not args.sweep:
        conf, out = resolve(args)
        return [(conf, out, args.resume)], f"python main.py --out {shlex.quote(out)} --resume{engine_options(args)}"
    key, sep, values = args.sweep.partition("=")
    if not sep or not values:
        raise RunError(f"--sweep expects KEY=V1,V2,..., got {args.sweep!r}")
    args.out = args.out or os.path.join("runs", time.strftime("%Y%m%d-%H%M%S") + f"-sweep-{key}")
    runs, raws = [], values.split(",")
    for raw in raws:  # every value is checked before the first run starts
        run_args = copy.copy(args)
        run_args.set, run_args.out = args.set + [f"{key}={raw}"], os.path.join(args.out, f"{key}={raw}")
        run_args.resume = args.resume and run_files.holds_run(run_args.out)
        runs.append((*resolve(run_args), run_args.resume))
    check_distinct(key, raws, runs)
    sources = {(conf["type"], conf["data_dir"]) for conf, _, _ in runs[1:]} - {(runs[0][0]["type"],
                                                                                 runs[0][0]["data_dir"])}
    for name, data_dir in sorted(sources):  # the first run's data is loaded before anything is written
        datasets.load(name, data_dir, "cpu")
    sets = "".join(f" --set {shlex.quote(s)}" for s in args.set)
    return runs, (f"python main.py -c {shlex.quote(args.conf or '')}{sets} --sweep {shlex.quote(args.sweep)} "
                  f"--out {shlex.quote(args.out)} --resume{engine_options(args)}")


def check_distinct(key, raws, runs):
    """Refuse two sweep values that are one run: the same folder, or the same config once parsed (0.5 and 0.50).
    Found only when the second run starts, the first would already have run for nothing."""
    for i, (raw, (conf, out, _)) in enumerate(zip(raws, runs)):
        for earlier_raw, (earlier_conf, earlier_out, _) in zip(raws[:i], runs[:i]):
            if conf == earlier_conf or os.path.normpath(out) == os.path.normpath(earlier_out):
                raise RunError(f"--sweep lists the same run twice: {key}={earlier_raw} and {key}={raw}; "
                               f"give each value once")


def engine_options(args):
    """The command-line options that chose the engine, to repeat in the command that continues a run."""
    if args.engine == "inprocess":
        options = [f"--parallel {args.parallel}"] if args.parallel > 1 else []
        options += [f"--client-cpus {args.client_cpus:g}"] if args.client_cpus else []
        return "".join(f" {option}" for option in options)
    options = [f"--engine {args.engine}", f"--timeout {args.timeout:g}"]
    if args.engine == "deployment":
        options.append(f"--superlink {shlex.quote(args.superlink)}")
    else:
        options += [f"--parallel {args.parallel}", f"--client-gpus {args.client_gpus:g}"]
        options += [f"--client-cpus {args.client_cpus:g}"] if args.client_cpus else []
    return " " + " ".join(options)


def train_rounds(conf, out, resume, args):
    """The run's rounds on the engine the command line asks for; returns the metrics rows."""
    if args.engine == "inprocess":
        return federation.run(conf, out, resume, functools.partial(inprocess.InProcess, parallel=args.parallel,
                                                                   client_cpus=args.client_cpus))
    try:
        from engines import flower  # Flower and Ray load only for these engines
    except ImportError as e:
        raise RunError(f"--engine {args.engine} needs Flower ({e}): pip install 'flwr[simulation]', "
                       f"or bash setup.sh") from None
    if args.engine == "deployment":
        return flower.deploy(conf, out, resume, args.superlink, args.timeout)
    return flower.simulate(conf, out, resume, args.parallel, args.client_cpus, args.client_gpus, args.timeout)


def start(conf, out, resume, args):
    """Run one config into `out`; returns its exit status (1 when no round changed the global model)."""
    earlier = saved_rounds(out) if resume else 0
    try:
        rows = train_rounds(conf, out, resume, args)
    except (*BAD_INPUT, run_files.SaveError):
        raise
    except (Exception, SystemExit) as e:  # a model or data of the user's that fails only on some inputs, say
        own = [key for key in config.USER_CODE_KEYS if user_code.is_spec(conf[key])]
        if not own:
            raise
        raise models.ModelError(f"the run failed in training or evaluation, with {' and '.join(own)} of your own "
                                f"({', '.join(conf[key] for key in own)}): {user_code.failure(e)}") from None
    refused = sum(row.get("refused", 0) for row in rows)
    if rows and refused == len(rows):
        print(f"error: no round of {out} changed the global model: in every round the uploads were rejected or came "
              f"after the deadline, or their aggregate was non-finite or changed no entry "
              f"({where_refusals_show(out, earlier, len(rows))})", file=sys.stderr)
        return 1
    if rows:
        sent, dense = run_files.upload_totals(rows)
        received = sum(row["download_bytes"] for row in rows)
        print(f"done: {out}  final accuracy {rows[-1]['accuracy']:.4f}, "
              f"uploaded {sent / 1e6:.2f} MB ({sent / dense:.1%} of dense), downloaded {received / 1e6:.2f} MB, "
              f"total {(sent + received) / 1e6:.2f} MB")
    if refused:
        print(f"note: {refused} of {len(rows)} rounds kept the global model as it was "
              f"(column 'refused' of {out}/metrics.csv)", file=sys.stderr)
    return 0


def saved_rounds(out):
    """How many rounds the run in `out` has saved: an earlier process played them, and printed their lines."""
    try:  # on the meta device no tensor takes memory: the clients' residuals can make a checkpoint gigabytes
        return len(run_files.load_checkpoint(out, "meta")["rows"])
    except Exception:  # a damaged checkpoint, which federation.run refuses in one line before it plays a round
        return 0


def where_refusals_show(out, earlier, total):
    """Where to read about a run's refused rounds: the lines this process printed as it played them; the `earlier`
    rounds, played before a --resume, are marked in metrics.csv."""
    column = f"the column 'refused' of {out}/metrics.csv"
    if not earlier:
        return "see the lines above"
    if earlier == total:
        return f"every round was played before this --resume: see {column}"
    rounds = "round 1" if earlier == 1 else f"rounds 1 to {earlier}"
    return f"see the lines above, and for {rounds}, played before this --resume, {column}"


def draw_sweep(runs, base_out):
    from utils import plot  # matplotlib loads only when a figure is drawn
    figure = os.path.join(base_out, "comparison.png")
    conf = runs[0][0]
    title = (f"{conf['type']}, {conf['model_name']}, {conf['no_models']} clients, k={conf['k']}, "
             f"{conf['sparsifier']} sparsifier, {conf['aggregation']} aggregation")
    plot.plot_runs([out for _, out, _ in runs], figure, title)
    print(f"figure: {figure}")


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one line and status 2, instead of argparse's usage block
        raise RunError(message)


def parse_args(argv):
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--conf", help="JSON config file (utils/conf.json)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key; VALUE is JSON or a bare string; may repeat")
    parser.add_argument("--out", help="the run's folder (default: a new folder under runs/)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out")
    parser.add_argument("--sweep", metavar="KEY=V1,V2,...", help="one run per value, then a comparison figure")
    parser.add_argument("--engine", choices=("inprocess", "flower", "deployment"), default="inprocess",
                        help="inprocess: clients train in this process, one after another (--parallel: some at "
                             "once, on threads); flower: on Flower's simulation engine (Ray); deployment: on a running "
                             "SuperLink and its SuperNodes (run this on the SuperLink's machine); all three give the "
                             "same metrics")
    parser.add_argument("--superlink", default="local-rehearsal", metavar="NAME",
                        help="--engine deployment: the SuperLink connection of $FLWR_HOME/config.toml to run on")
    # waits longer than threading.TIMEOUT_MAX (292 years) raise OverflowError
    parser.add_argument("--timeout", type=positive(float, most=threading.TIMEOUT_MAX), default=600.0,
                        metavar="SECONDS",
                        help="Flower engines: how long a round waits for a client before leaving it out")
    parser.add_argument("--parallel", type=positive(int), default=1, metavar="N",
                        help="how many clients train at once (at most k): in-process, on threads of this process, "
                             "each with its own model (CPU only); --engine flower: Ray actors, each with its own "
                             "copy of the data and a model")
    parser.add_argument("--client-cpus", type=client_cpus, metavar="C",
                        help="torch threads each client trains with (a fraction rounds down, to at least 1; default: "
                             "this process's torch threads divided by --parallel); --engine flower: CPUs per actor")
    parser.add_argument("--client-gpus", type=gpu_share, default=0.0, metavar="G",
                        help="--engine flower: GPUs per actor, a fraction up to 1 shares one (default 0)")
    parser.add_argument("--dry-run", action="store_true",
                        help="check the command line as a run would (config, run folder; a sweep: every value) and "
                             "print what would run, without running: the run folder (--out, given or chosen), then "
                             "one line per run: its no_models and its folder, tab-separated")
    return parser.parse_args(argv)


def positive(kind, zero=False, most=None):
    """An argparse type: a finite number of `kind` above 0 (or at least 0), and at most `most`."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if isinstance(value, float) and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
        if not (value >= 0 if zero else value > 0):
            raise argparse.ArgumentTypeError(f"{text!r} must be {'at least' if zero else 'above'} 0")
        if most is not None and value > most:
            raise argparse.ArgumentTypeError(f"{text!r} is more than {most:.0f}")
        return value
    return parse


def cpus():
    """The CPUs this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def client_cpus(text):
    """An argparse type for --client-cpus: above 0 and at most this machine's CPUs (a client's torch threads: more
    than the CPUs only wait for each other, and torch fails or crashes on counts in the millions)."""
    value = positive(float)(text)
    if value > cpus():
        raise argparse.ArgumentTypeError(f"{text!r} is more than this machine's {cpus()} CPUs")
    return value


def gpu_share(text):
    """An argparse type for --client-gpus: Ray gives an actor a share of one GPU, at its precision of 0.0001, or whole
    GPUs (not 1.5)."""
    value = positive(float, zero=True)(text)
    if value and not (0.0001 <= value <= 1 or value.is_integer()):
        raise argparse.ArgumentTypeError(f"{text!r} is neither a share of one GPU (0.0001 to 1) nor a whole number")
    return value


@contextlib.contextmanager
def sigterm_as_interrupt():
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return
    previous = signal.signal(signal.SIGTERM, raise_terminated)
    try:
        yield
    finally:
        # raise_terminated before the block is the handler this script set for its imports. After the block the work
        # is over and saved; what is left is the exit, and torch's teardown takes a second: a SIGTERM then would print
        # a traceback or, once Python has put back the default handler, end a finished run by the signal. So it is
        # ignored, and the process exits with the status the work gave it.
        signal.signal(signal.SIGTERM, signal.SIG_IGN if previous is raise_terminated else previous)


def one_line(error):
    return " ".join(str(error).split())


def main(argv=None):
    allocator.keep_freed_memory()  # each client's model-sized tensors reuse the last one's pages
    runs, continue_with = [], None
    try:  # outside the block, so that a SIGTERM as the block ends is a stop reported like any other
        with sigterm_as_interrupt():
            args = parse_args(argv)
            runs, continue_with = plan(args)
            if args.dry_run:  # deploy/local.sh asks, to start one node per client and to know where the run goes
                print(args.out or runs[0][1])
                for conf, out, _ in runs:
                    print(f"{conf['no_models']}\t{out}")
                return 0
            status = 0
            for conf, out, resume in runs:
                if args.sweep:
                    print(f"== {out}")
                status = max(status, start(conf, out, resume, args))
            if args.sweep:
                draw_sweep(runs, args.out)
            return status
    except run_files.SaveError as e:
        saved = any(run_files.holds_run(out) for _, out, _ in runs)
        print(f"error: {one_line(e)}" + (f"; finished rounds are saved, continue with: {continue_with}"
                                         if saved else ""), file=sys.stderr)
        return 2
    except BAD_INPUT as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as stop:
        how = "interrupted by SIGTERM" if isinstance(stop, Terminated) else "interrupted"
        if any(run_files.holds_run(out) for _, out, _ in runs):
            print(f"\n{how}: finished rounds are saved; continue with: {continue_with}", file=sys.stderr)
        else:
            print(f"\n{how} before any round finished: nothing was saved", file=sys.stderr)
        return exit_status(stop)


if __name__ == "__main__":
    sys.exit(main())
