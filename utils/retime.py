"""Re-time a finished run under another client profile, without training again.

    python -m utils.retime RUN --profile wifi [--step-seconds S] [--out DIR]

A run made with `clock: simulated` writes clients.csv: per round and client, the bytes it downloaded and uploaded and
its local steps. When every client was online and none could be dropped (no deadline, no over-selection, availability
1), the round's clients and bytes do not depend on the profile, so the clock is a function of that file alone: this
writes DIR (default RUN-PROFILE) with the run's config.json under the new profile, and metrics.csv and clients.csv
whose time columns are what a run made with that profile would have written (every other column is the run's).
"""
import csv
import os
import sys

import clock
from utils import cli, config, run_files

INTEGER_COLUMNS = ("round", "client", "download_bytes", "steps", "upload_bytes")
MOST_COUNT = 2**53  # a round, byte or step count beyond this is not one (and would not convert to a float exactly)


class RetimeError(ValueError):
    """A run that cannot be re-timed, or a profile that does not fit it; the message says why."""


def retime(run_dir, profile, step_seconds=None):
    """(the config under `profile`, the run's metrics rows with their time columns and timings made anew)."""
    try:
        conf = config.validate(run_files.read_config(run_dir))
    except (OSError, ValueError) as e:
        raise RetimeError(f"cannot read {run_dir}/config.json: {e}") from None
    if conf["clock"] != "simulated":
        raise RetimeError(f"{run_dir} was made without the simulated clock: its clients' bytes were not logged "
                          f"(run it with --set clock=simulated)")
    if conf["mode"] == "async" or clock.may_drop(conf) or not always_online(conf):
        raise RetimeError(f"{run_dir} could drop clients, sample among those online or run asynchronously: which "
                          f"clients trained, and when, depended on its profile")
    try:
        with open(os.path.join(run_dir, "metrics.csv"), newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))  # as written: every column but the time's is copied as it is
        records = read_clients(run_dir, conf["no_models"])
        check_consistent(rows, records)
    except (OSError, ValueError, csv.Error) as e:
        raise RetimeError(f"cannot re-time {run_dir}: {e}") from None
    new = config.validate({**conf, "profile": profile,
                           **({"step_seconds": step_seconds} if step_seconds is not None else {})})
    if not always_online(new):
        raise RetimeError(f"profile {profile} has clients that are not always online: a run under it would sample "
                          f"others")
    profiles = clock.Profiles.for_run(new)
    elapsed = 0.0
    for row in rows:
        round_index = int(row["round"])
        timings, seconds = clock.play(profiles, new, round_index, records[round_index], new["k"])
        elapsed = clock.elapsed(elapsed, round(seconds, 6))
        row.update({"round_seconds": round(seconds, 6), "sim_seconds": elapsed,
                    "timings": [timing.row() for timing in timings]})
    return new, rows


def always_online(conf):
    return clock.Profiles.for_run(conf).online(conf["seed"], 1) is None


def read_clients(run_dir, clients):
    """clients.csv as {round: [(client, download bytes, steps, upload bytes), ...]} in the file's order; ValueError
    names a line whose client is not one of the run's or whose counts are not counts."""
    records = {}
    with open(os.path.join(run_dir, "clients.csv"), newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        for row in reader:
            try:
                values = [int(row[column]) for column in INTEGER_COLUMNS]
            except (KeyError, TypeError, ValueError):
                raise ValueError(f"clients.csv line {reader.line_num} is not a round's client") from None
            if not 0 <= values[1] < clients or not all(0 <= v < MOST_COUNT for v in values):
                raise ValueError(f"clients.csv line {reader.line_num}: its client or a count is out of range")
            records.setdefault(values[0], []).append(tuple(values[1:]))
    return records


def check_consistent(rows, records):
    """ValueError unless metrics.csv's rounds are 1, 2, ... and each round's clients and bytes in clients.csv are the
    ones metrics.csv counted."""
    if not rows:
        raise ValueError("metrics.csv holds no round")
    for number, row in enumerate(rows, 1):
        try:
            same = (int(row["round"]) == number and
                    row["clients"].split() == [str(c) for c, _, _, _ in records.get(number, [])] and
                    int(row["upload_bytes"]) == sum(up for _, _, _, up in records[number]) and
                    int(row["download_bytes"]) == sum(down for _, down, _, _ in records[number]))
        except (KeyError, TypeError, ValueError, AttributeError):
            same = False
        if not same:
            raise ValueError(f"round {number} of metrics.csv and its clients in clients.csv do not match")
    if set(records) - set(range(1, len(rows) + 1)):
        raise ValueError("clients.csv holds rounds that metrics.csv does not")


def main(argv=None):
    parser = cli.ArgumentParser(__doc__)
    parser.add_argument("run", help="a finished run's folder, made with clock=simulated")
    parser.add_argument("--profile", required=True, help="a preset (datacenter, wifi, mobile, mixed) or a CSV path")
    parser.add_argument("--step-seconds", type=float, help="another step_seconds (default: the run's)")
    parser.add_argument("--out", help="where to write (default: RUN-PROFILE)")
    args = parser.parse_args(argv)
    out = args.out or f"{os.path.normpath(args.run)}-{os.path.splitext(os.path.basename(args.profile))[0]}"
    try:
        conf, rows = retime(args.run, args.profile, args.step_seconds)
        taken = [name for name in ("metrics.csv", "checkpoint.pt", "config.json") if os.path.exists(os.path.join(out,
                                                                                                            name))]
        if taken:
            raise RetimeError(f"{out} already holds a run's {taken[0]}: give another --out, or remove it")
        os.makedirs(out, exist_ok=True)
        run_files.write_config(out, conf)
        run_files.write_metrics(out, rows)
    except (RetimeError, config.ConfigError, clock.ProfileError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: cannot write {out}: {e.strerror or e}", file=sys.stderr)
        return 2
    last = rows[-1]
    print(f"{out}: {len(rows)} rounds under {args.profile}, {last['sim_seconds']:.1f} simulated seconds in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
