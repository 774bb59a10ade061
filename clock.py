"""The simulated clock: what a round costs in seconds, computed from the bytes each client moved, its local steps and
its profile, never from the host's time (config key `clock`: none | simulated).

A sampled client's time in a round is

    download:  its download's bytes * 8 / downlink + latency
    compute:   its local SGD steps * step_seconds * slowness
    upload:    its upload's bytes * 8 / uplink + latency

and it finishes at their sum. A synchronous round waits for every client it keeps: all of them by default; with a
`deadline`, those finished by then; with `over_select` above 1 it samples ceil(k * over_select) and keeps the first k
to finish (ties broken by a seeded order). The round lasts until its last kept client finishes, or until the deadline
when a client is dropped. A dropped client downloaded and trained (its model is in sync) but its upload is discarded;
its bytes are counted apart.

Profiles (`profile`): each client's uplink and downlink (Mbit/s), latency (ms), slowness (a factor on step_seconds)
and availability (the probability it is online in a round), drawn once from a preset's seeded distributions, or read
from a CSV with one row per client. PRESETS names where their numbers come from.
"""
import csv
import hashlib
import math
import dataclasses

import numpy as np
import torch

from utils.seeding import derive_seed, generator

CSV_COLUMNS = ("client", "uplink_mbps", "downlink_mbps", "latency_ms", "slowness", "availability")
# a profile's values: 1 bit/s to 1 Pbit/s, up to a day of latency, a millionth to a million times the reference
# device's speed: wide enough for any device, narrow enough that no time overflows
BOUNDS = {"uplink_mbps": (1e-6, 1e9), "downlink_mbps": (1e-6, 1e9), "latency_ms": (0, 86_400_000),
          "slowness": (1e-6, 1e6), "availability": (0, 1)}
MOST_LINE = 1000  # characters in a line of a profile CSV: a row needs about 60


class ProfileError(ValueError):
    """A profile the clock cannot use: an unknown preset, or a CSV that does not describe the run's clients."""


@dataclasses.dataclass(frozen=True)
class Spread:
    """A log-normal distribution: `median`, and `sigma` of the log (0: every client gets the median). With `tail`, a
    share `tail` of the clients draws from `tail_median` instead (a heavy tail of slow links)."""
    median: float
    sigma: float = 0.0
    tail: float = 0.0
    tail_median: float = 0.0

    def draw(self, rng, count):
        values = self.median * np.exp(self.sigma * rng.standard_normal(count))
        if self.tail:
            slow = rng.random(count) < self.tail
            values[slow] = self.tail_median * np.exp(self.sigma * rng.standard_normal(int(slow.sum())))
        return values


# Medians of links and latency follow the Speedtest Global Index (Ookla, 2024: mobile about 50 Mbit/s down, 10 up,
# 25-30 ms; fixed broadband about 90 down, 40 up, 10 ms); the mobile tail follows the slow uplinks of FedScale's
# device traces (Lai et al., ICML 2022) and the 2 Mbit/s phone of the issue that asked for this clock. Slowness is a
# factor on this machine's step (a 2-core x86 server): a datacenter node is 4 times faster, a laptop on Wi-Fi as
# fast, a phone 3 times slower with a wide spread; these are our assumptions, ordered as FedScale's compute traces
# (AI Benchmark) order devices, not measurements of ours.
PRESETS = {
    "datacenter": {"uplink": Spread(10_000), "downlink": Spread(10_000), "latency": Spread(0.5),
                   "slowness": Spread(0.25)},
    "wifi": {"uplink": Spread(40, 0.6), "downlink": Spread(90, 0.6), "latency": Spread(10, 0.4),
             "slowness": Spread(1.0, 0.3)},
    "mobile": {"uplink": Spread(10, 0.8, tail=0.2, tail_median=2), "downlink": Spread(50, 0.8),
               "latency": Spread(30, 0.4), "slowness": Spread(3.0, 0.5)},
}
MIXED = ("wifi", "mobile")  # 'mixed': each client is drawn from one of these, with equal chance


class Profiles:
    """Per client: uplink and downlink in bits/s, latency in s, slowness, availability; numpy float64 arrays (five
    floats per client: 100,000 clients take 4 MB)."""

    def __init__(self, uplink_mbps, downlink_mbps, latency_ms, slowness, availability):
        self.uplink = np.asarray(uplink_mbps, dtype=np.float64) * 1e6
        self.downlink = np.asarray(downlink_mbps, dtype=np.float64) * 1e6
        self.latency = np.asarray(latency_ms, dtype=np.float64) / 1e3
        self.slowness = np.asarray(slowness, dtype=np.float64)
        self.availability = np.asarray(availability, dtype=np.float64)

    @classmethod
    def preset(cls, name, clients, seed, availability):
        """The profiles of `clients` clients drawn from preset `name` ('mixed': wifi or mobile each), seeded."""
        rng = np.random.default_rng(derive_seed(seed, "profile", name))
        drawn = {}
        for key in PRESETS["wifi"]:
            if name == "mixed":
                mobile = rng.random(clients) < 0.5
                values = PRESETS["wifi"][key].draw(rng, clients)
                values[mobile] = PRESETS["mobile"][key].draw(rng, clients)[mobile]
            else:
                values = PRESETS[name][key].draw(rng, clients)
            drawn[key] = values
        return cls(drawn["uplink"], drawn["downlink"], drawn["latency"], drawn["slowness"],
                   np.full(clients, float(availability)))

    @classmethod
    def read_csv(cls, path, clients):
        """The profiles in CSV `path`: the header CSV_COLUMNS and one row per client 0 .. clients-1, in any order
        (blank lines and a byte-order mark are allowed). ProfileError names the first line that is not so. Memory
        stays proportional to the file's rows: a line is read at most MOST_LINE characters at a time, and the arrays
        are made only once every client has its row."""
        rows = {}
        try:
            with open(path, newline="", encoding="utf-8-sig") as f:
                header = None
                for number, line in enumerate(iter(lambda: f.readline(MOST_LINE + 1), ""), 1):
                    where = f"profile {path} line {number}"
                    if len(line) > MOST_LINE:
                        raise ProfileError(f"{where} is longer than {MOST_LINE} characters")
                    if not line.strip():
                        continue
                    cells = [cell.strip() for cell in next(csv.reader([line]))]
                    if header is None:
                        header = cells
                        if header != list(CSV_COLUMNS):
                            raise ProfileError(f"profile {path}: the header must be {','.join(CSV_COLUMNS)}, got "
                                               f"{','.join(header)[:200]!r}")
                        continue
                    if len(cells) != len(CSV_COLUMNS):
                        raise ProfileError(f"{where}: {len(cells)} cells, expected {len(CSV_COLUMNS)}")
                    client = parse_client(cells[0], clients, where)
                    if client in rows:
                        raise ProfileError(f"{where}: client {client} appears twice")
                    rows[client] = [parse_number(cell, name, where) for cell, name in zip(cells[1:], CSV_COLUMNS[1:])]
        except OSError as e:
            raise ProfileError(f"cannot read profile {path}: {e.strerror or e}") from None
        except (UnicodeDecodeError, csv.Error) as e:
            raise ProfileError(f"profile {path} is not a CSV file of text ({e})") from None
        if header is None:
            raise ProfileError(f"profile {path} is empty: it needs the header {','.join(CSV_COLUMNS)} and a row per "
                               f"client")
        if len(rows) < clients:
            missing = next(c for c in range(clients) if c not in rows)
            raise ProfileError(f"profile {path} has no row for client {missing} (the run has {clients} clients, 0 to "
                               f"{clients - 1})")
        return cls(*np.array([rows[c] for c in range(clients)], dtype=np.float64).T)

    @classmethod
    def for_run(cls, conf):
        """The run's profiles, or None when it has no clock. Raises ProfileError."""
        if conf["clock"] == "none":
            return None
        if is_preset(conf["profile"]):
            return cls.preset(conf["profile"], conf["no_models"], conf["seed"], conf["availability"])
        if conf["availability"] != 1:
            raise ProfileError(f"the profile {conf['profile']} gives each client's availability in its column: leave "
                               f"the key 'availability' at 1")
        return cls.read_csv(conf["profile"], conf["no_models"])

    def online(self, seed, round_index):
        """The ids of the clients online in round `round_index` (a seeded draw per client), or None when every client
        always is."""
        if (self.availability >= 1).all():
            return None
        return np.flatnonzero(self.draw_online(seed, round_index))

    def draw_online(self, seed, round_index):
        """Per client, whether a fresh draw puts it online in round `round_index` (with its availability)."""
        return uniform(len(self.availability), seed, "online", round_index) < self.availability

    def times(self, client, download_bytes, steps, upload_bytes, step_seconds):
        """(download, compute, upload) seconds of `client` in a round."""
        return (download_bytes * 8 / self.downlink[client] + self.latency[client],
                steps * step_seconds * self.slowness[client],
                upload_bytes * 8 / self.uplink[client] + self.latency[client])


def uniform(count, *stream):
    """`count` seeded uniform draws in [0, 1), float64, from the named stream."""
    return torch.rand(count, generator=generator(*stream), dtype=torch.float64).numpy()


def is_preset(profile):
    return profile in PRESETS or profile == "mixed"


def check_profile(conf):
    """Refuse, before any data is loaded, a profile the run cannot use: a CSV that is not there or does not describe
    the run's clients (read to check it: its memory is proportional to the file's rows, not to no_models)."""
    if conf["clock"] != "none" and not is_preset(conf["profile"]):
        Profiles.for_run(conf)


def parse_client(text, clients, where):
    try:
        client = int(text)
    except ValueError:
        raise ProfileError(f"{where}: client {text[:40]!r} is not an integer") from None
    if not 0 <= client < clients:
        raise ProfileError(f"{where}: client {client} is not one of the run's {clients} (0 to {clients - 1})")
    return client


def parse_number(text, name, where):
    """A profile's value, within BOUNDS: what keeps every time finite."""
    try:
        value = float(text)
    except ValueError:
        raise ProfileError(f"{where}: {name} {text[:40]!r} is not a number") from None
    low, high = BOUNDS[name]
    if not low <= value <= high:  # NaN fails too
        raise ProfileError(f"{where}: {name} must be a number from {low:g} to {high:g}, got {text[:40]!r}")
    return value


@dataclasses.dataclass
class Timing:
    """One client's round on the clock."""
    client: int
    download_bytes: int
    steps: int
    upload_bytes: int
    download_s: float
    compute_s: float
    upload_s: float
    arrived: bool = True  # False: dropped, its upload discarded

    @property
    def finish_s(self):
        return self.download_s + self.compute_s + self.upload_s

    def row(self):
        """As a row of clients.csv holds it (seconds unrounded), finish_s included."""
        return {**dataclasses.asdict(self), "finish_s": self.finish_s}


def elapsed(before, round_seconds):
    """The simulated time after a round of `round_seconds` that started at `before` (as metrics.csv writes it)."""
    return round(before + round_seconds, 6)


def may_drop(conf):
    """Whether a sampled client's upload may be discarded: a deadline, or more clients sampled than kept."""
    return conf["clock"] != "none" and (conf["deadline"] > 0 or conf["over_select"] > 1)


class Clock:
    """A run's simulated clock: its clients' profiles and local steps per round."""

    def __init__(self, conf, steps):
        self.conf = conf
        self.profiles = Profiles.for_run(conf)
        self.steps = steps  # per client, its local SGD steps in a round
        self.spell = (0, None)  # with availability_memory: (the last round computed, who was online in it)
        # what the checkpoint keeps of the profile, so that a resume can tell whether its CSV changed since: the
        # file's SHA-256 as this run read it (None for a preset, which the seed determines)
        self.source = None
        if not is_preset(conf["profile"]):
            with open(conf["profile"], "rb") as f:
                self.source = hashlib.sha256(f.read()).hexdigest()

    def online(self, round_index):
        """The ids of the clients online in round `round_index`, or None when every client always is. With
        `availability_memory` m, a client keeps last round's state with probability m and is drawn afresh otherwise:
        online a share `availability` of the rounds still, in spells 1 / (1 - m) times longer. The states are
        computed forward from round 1 (and kept for the next call), so a resumed run finds the same ones."""
        memory, seed = self.conf["availability_memory"], self.conf["seed"]
        if not memory or (self.profiles.availability >= 1).all():
            return self.profiles.online(seed, round_index)
        if self.spell[0] > round_index:
            self.spell = (0, None)
        last, state = self.spell
        for r in range(last + 1, round_index + 1):
            fresh = self.profiles.draw_online(seed, r)
            state = fresh if state is None else np.where(uniform(len(fresh), seed, "online memory", r) < memory,
                                                         state, fresh)
        self.spell = (round_index, state)
        return np.flatnonzero(state)

    def sampled(self):
        """How many clients a round samples: ceil(k * over_select), at most every client."""
        wanted = math.ceil(round(self.conf["k"] * self.conf["over_select"], 9))  # 10 * 1.1 is 11.000000000000002
        return min(wanted, self.conf["no_models"])

    def play(self, round_index, sizes):
        """Time a synchronous round from `sizes`: (client, download bytes, upload bytes) per sampled client."""
        return play(self.profiles, self.conf, round_index,
                    [(client, down, self.steps[client], up) for client, down, up in sizes], self.conf["k"])

    def play_one(self, client, download_bytes, upload_bytes):
        """The Timing of one client (FedBuff's, which starts and arrives on its own)."""
        return time_client(self.profiles, self.conf, (client, download_bytes, self.steps[client], upload_bytes))


def time_client(profiles, conf, record):
    """The Timing of a client's `record`: (client, download bytes, local steps, upload bytes)."""
    times = [float(t) for t in profiles.times(*record, conf["step_seconds"])]
    if not all(map(math.isfinite, times)):  # the bounds on profiles and step_seconds keep this from happening
        raise ProfileError(f"client {record[0]}'s simulated time is not finite: {times}")
    return Timing(*record, *times)


def play(profiles, conf, round_index, records, keep):
    """Time a synchronous round. `records`: (client, download bytes, local steps, upload bytes) per sampled client;
    `keep`: how many to keep at most (k). Returns (the Timings, in the records' order, each marked kept or dropped;
    the round's seconds)."""
    timings = [time_client(profiles, conf, record) for record in records]
    ties = torch.randperm(len(timings), generator=generator(conf["seed"], "finish ties", round_index)).tolist()
    order = sorted(range(len(timings)), key=lambda i: (timings[i].finish_s, ties[i]))
    deadline = conf["deadline"] or math.inf
    kept = [i for i in order if timings[i].finish_s <= deadline][:keep]
    for i in set(range(len(timings))) - set(kept):
        timings[i].arrived = False
    if len(kept) < len(timings) and len(kept) < keep:  # someone missed the deadline: the round waited for it
        return timings, deadline
    return timings, max((timings[i].finish_s for i in kept), default=0.0)
