"""deploy/local.sh, the rehearsal of a Flower deployment on 127.0.0.1: it checks its options, the config and the ports
before starting anything (one `error:` line, exit status 2, fast); it talks only to the SuperLink it started (TLS with
its own CA, and after each start the listener on the port must be the process started); only the SuperNodes whose
keys it registered can join; after a stop it prints the command that continues only when there is a run to continue.
(The full rehearsal, stopped and continued, with metrics equal to the in-process loop's: tests/test_engines.py.)"""
import contextlib
import glob
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time

import pytest

import main
from conftest import ROOT, TINY, free_ports

DEPLOY = os.path.join(ROOT, "deploy", "local.sh")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "FLWR_TELEMETRY_ENABLED": "0",
       "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}


@contextlib.contextmanager
def listening(port, host="127.0.0.1"):
    """A foreign server: a plain socket listening on host:port; on "::", for IPv4 too, as servers mostly bind it."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as server:
        if host == "::":
            server.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        server.bind((host, port))
        server.listen()
        yield


def shown(host):
    """How an address is written beside a port: IPv6 in brackets."""
    return f"[{host}]" if ":" in host else host


class Rehearsal:
    """deploy/local.sh run in a session of its own (so that a signal reaches it as Ctrl-C would reach a terminal's
    job), its temporary $FLWR_HOME under `tmp`, its output in files."""

    def __init__(self, tmp, *args):
        self.tmp = tmp
        self.tmp.mkdir(exist_ok=True)
        self.stdout, self.stderr = tmp / "stdout", tmp / "stderr"
        with open(self.stdout, "w") as out, open(self.stderr, "w") as err:
            self.process = subprocess.Popen(["bash", DEPLOY, *map(str, args)], cwd=ROOT, stdout=out, stderr=err,
                                            env={**ENV, "TMPDIR": str(tmp)}, start_new_session=True)
        self.started = time.monotonic()

    def flwr_home(self):
        homes = glob.glob(str(self.tmp / "fedsparse-flower.*"))
        return homes[0] if homes else None

    def wait_for(self, condition, what, timeout=60):
        deadline = time.monotonic() + timeout
        while not condition():
            assert self.process.poll() is None, f"deploy/local.sh ended before {what}: {self.stderr.read_text()}"
            assert time.monotonic() < deadline, f"no {what} after {timeout} s: {self.stderr.read_text()}"
            time.sleep(0.1)

    def signal(self, signum):
        os.killpg(self.process.pid, signum)

    def finish(self, timeout=60):
        """(exit status, stdout, stderr, seconds); a script still running after `timeout` is stopped, and fails."""
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            pytest.fail(f"deploy/local.sh still ran after {timeout} s: {self.stderr.read_text()[-2000:]}")
        return (self.process.returncode, self.stdout.read_text(), self.stderr.read_text(),
                time.monotonic() - self.started)

    def stop(self):
        if self.process.poll() is None:
            self.signal(signal.SIGTERM)  # its trap stops what it started, by PID
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                self.process.wait()


@pytest.fixture
def rehearse(tmp_path):
    """Start deploy/local.sh with these arguments; at the end, nothing that it or the test started still runs."""
    rehearsals = []

    def start(*args):
        rehearsals.append(Rehearsal(tmp_path / "tmp", *args))
        return rehearsals[-1]
    yield start
    for rehearsal in rehearsals:
        rehearsal.stop()
    time.sleep(0.5)
    leftovers = subprocess.run(["pgrep", "-af", str(tmp_path)], capture_output=True, text=True).stdout
    assert leftovers == "", leftovers  # every process the script started names its temporary $FLWR_HOME


def conf_file(tmp_path, **overrides):
    path = tmp_path / "conf.json"
    path.write_text(json.dumps({**TINY, "data_dir": str(tmp_path / "data"), **overrides}))
    return path


def assert_refused_at_once(result, *words):
    status, _, err, seconds = result
    assert status == 2 and err.startswith("error:") and len(err.strip().splitlines()) == 1, err
    assert all(word in err for word in words), err
    assert seconds < 30, seconds  # no wait for a node or a timeout


def nothing_started(tmp_path, out):
    """No $FLWR_HOME was made (only the test's own output files are in the script's TMPDIR), no run folder."""
    return sorted(os.listdir(tmp_path / "tmp")) == ["stderr", "stdout"] and not out.exists()


# ---- checked before anything starts -------------------------------------------------------------------------------

@pytest.mark.parametrize("options, words", [
    (["--nodes", "4", "--port"], ["--port needs a value"]),
    (["--nodes", "4", "--port", "--", "-c", "x.json"], ["--port needs a value"]),
    (["--nodes"], ["--nodes needs a value"]),
    (["--nodes", "0", "--", "-c", "x.json"], ["--nodes"]),
    (["--nodes", "4", "--port", "abc", "--", "-c", "x.json"], ["--port", "'abc'"]),
    (["--nodes", "4", "--port", "70000", "--", "-c", "x.json"], ["--port", "70000"]),
    (["--nodes", "4", "--node-port", "65533", "--", "-c", "x.json"], ["--node-port", "65533"]),
    (["--nodes", "4", "--port", "9096", "--node-port", "9094", "--", "-c", "x.json"], ["9096", "distinct"]),
])
def test_bad_options_are_one_line_at_once(rehearse, options, words):
    assert_refused_at_once(rehearse(*options).finish(), *words)


def test_nodes_must_match_the_config_main_py_resolves(rehearse, tmp_path):
    conf, out = conf_file(tmp_path), tmp_path / "run"  # no_models 4
    assert_refused_at_once(rehearse("--nodes", "2", "--", "-c", conf, "--out", out).finish(),
                           "--nodes 2", "no_models=4")
    assert nothing_started(tmp_path, out)
    # a resumed run's config is the one it started with, which main.py reads from the run folder
    assert main.main(["-c", str(conf), "--set", "global_epochs=1", "--set", "no_models=3", "--set", "k=1",
                      "--out", str(out)]) == 0
    assert_refused_at_once(rehearse("--nodes", "4", "--", "--out", out, "--resume").finish(),
                           "--nodes 4", "no_models=3")


@pytest.mark.parametrize("host", ["127.0.0.1", "::"])  # [::] takes 127.0.0.1 too
@pytest.mark.parametrize("busy", ["superlink", "node"])
def test_a_foreign_server_on_a_port_stops_the_rehearsal_before_it_starts(rehearse, tmp_path, busy, host):
    """The message names the listener at the address it has, where the user will look for it."""
    conf, out = conf_file(tmp_path, no_models=2, k=1), tmp_path / "run"
    port = free_ports(3)
    node_port = port + 1
    taken = port if busy == "superlink" else node_port + 1
    with listening(taken, host):
        result = rehearse("--nodes", "2", "--port", port, "--node-port", node_port, "--", "-c", conf,
                          "--out", out).finish()
    assert_refused_at_once(result, f"cannot use 127.0.0.1:{taken}", "--port" if busy == "superlink" else "SuperNode 1",
                           f"by {shown(host)}:{taken} (process {os.getpid()})")
    assert nothing_started(tmp_path, out)


@pytest.mark.parametrize("host", ["127.0.0.2", "::1"])
def test_a_listener_other_than_the_superlink_started_stops_the_rehearsal(rehearse, tmp_path, host):
    """127.0.0.1:P is free, so the SuperLink starts there; but another process listens on P too (on 127.0.0.2, or on
    [::1], where a client of localhost:P may land): whoever listens on the port must be the SuperLink that was started,
    else everything stops, and the message names the other listener's address."""
    conf, out = conf_file(tmp_path, no_models=1, k=1), tmp_path / "run"
    port = free_ports(2)
    node_port = port + 1
    with listening(port, host):
        status, _, err, _ = rehearse("--nodes", "1", "--port", port, "--node-port", node_port, "--", "-c", conf,
                                     "--out", out).finish()
    assert status == 2, err
    assert f"error: {shown(host)}:{port} is held by process {os.getpid()}, not by the SuperLink" in err, err
    assert not out.exists()


# ---- only our nodes join; the command that continues ----------------------------------------------------------------

def test_an_unregistered_node_is_refused_and_a_run_stopped_before_saving_is_not_offered_to_continue(rehearse,
                                                                                                    tmp_path):
    conf, out = conf_file(tmp_path, no_models=1, k=1, global_epochs=50), tmp_path / "run"
    port = free_ports(4)
    node_port, rogue_port = port + 1, port + 2
    rehearsal = rehearse("--nodes", "1", "--port", port, "--node-port", node_port, "--", "-c", conf, "--out", out)
    rehearsal.wait_for(lambda: rehearsal.flwr_home() and os.path.exists(os.path.join(
        rehearsal.flwr_home(), "logs", "supernode-0.log")), "SuperNode")
    home = rehearsal.flwr_home()
    # strangers who know the address and trust its CA: one with a key of its own, one without a key
    (tmp_path / "rogue").mkdir()
    subprocess.run([sys.executable, os.path.join(ROOT, "deploy", "credentials.py"), tmp_path / "rogue", "1"],
                   check=True)
    rogues = []
    for i, key in enumerate([["--auth-supernode-private-key", tmp_path / "rogue" / "node-0.key"], []]):
        with open(tmp_path / f"rogue-{i}.log", "w") as log:
            rogues.append(subprocess.Popen(
                ["flower-supernode", "--superlink", f"127.0.0.1:{port}", "--root-certificates",
                 os.path.join(home, "credentials", "ca.crt"), *key, "--port", str(rogue_port + i),
                 "--max-retries", "3", "--node-config", "partition-id=0 num-partitions=1"],
                env=ENV, stdout=log, stderr=subprocess.STDOUT))
    try:
        codes = [rogue.wait(timeout=60) for rogue in rogues]
    finally:
        for rogue in rogues:
            rogue.kill()
    logs = [(tmp_path / f"rogue-{i}.log").read_text() for i in range(2)]
    assert codes[0] != 0 and "Failed to activate SuperNode" in logs[0], logs[0]
    assert codes[1] != 0 and "All SuperNodes must be registered" in logs[1], logs[1]
    # the run goes on with its own node; stopped before its first round is saved, there is nothing to continue
    rehearsal.wait_for(lambda: "data:" in rehearsal.stdout.read_text(), "run")
    rehearsal.signal(signal.SIGINT)
    status, _, err, _ = rehearsal.finish()
    superlink_log = open(os.path.join(home, "logs", "superlink.log")).read()
    assert "No SuperNode found with the given public key" in superlink_log  # the SuperLink refused the stranger
    assert status == 130
    if not os.path.exists(out / "checkpoint.pt"):
        assert "nothing was saved" in err and "continue" not in err, err
    else:  # the first round was quicker than the signal: continuing is right, with the options given
        command = shlex.split(err.split("continue on a new rehearsal with:")[1].splitlines()[0])
        assert command[-5:] == ["-c", str(conf), "--out", str(out), "--resume"], err


def test_stopped_while_the_nodes_start_there_is_nothing_to_continue(rehearse, tmp_path):
    conf, out = conf_file(tmp_path, no_models=1, k=1), tmp_path / "run"
    port = free_ports(2)
    rehearsal = rehearse("--nodes", "1", "--port", port, "--node-port", port + 1, "--", "-c", conf, "--out", out)
    rehearsal.wait_for(lambda: rehearsal.flwr_home() and os.path.exists(os.path.join(
        rehearsal.flwr_home(), "logs", "supernode-0.log")), "SuperNode")
    rehearsal.signal(signal.SIGINT)
    status, _, err, _ = rehearsal.finish()
    assert status == 130 and "continue" not in err and not out.exists(), err


def test_dry_run_prints_the_run_folder_and_its_clients_without_running(run_main, write_conf, tmp_path):
    status, out, err = run_main("-c", write_conf(), "--out", tmp_path / "run", "--dry-run")
    assert status == 0 and out == f"{tmp_path / 'run'}\n4\t{tmp_path / 'run'}\n" and not (tmp_path / "run").exists()
    status, out, err = run_main("-c", write_conf(), "--sweep", "no_models=3,5", "--out", tmp_path / "sweep",
                                "--dry-run")
    assert status == 0 and out.splitlines() == [str(tmp_path / "sweep"), f"3\t{tmp_path / 'sweep' / 'no_models=3'}",
                                                f"5\t{tmp_path / 'sweep' / 'no_models=5'}"]


# ---- the credentials ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("target", ["missing", "a file"])
@pytest.mark.parametrize("name", ["ca.key", "node-1.pub"])  # the first file written, and the last
def test_credentials_are_never_written_through_a_symbolic_link(tmp_path, name, target):
    """A link planted in the folder where a credential goes would send the key wherever it points: one line, status 2,
    and nothing is written through it (a missing target is not created, a file there is not changed)."""
    folder, elsewhere = tmp_path / "credentials", tmp_path / "elsewhere"
    folder.mkdir()
    if target == "a file":
        elsewhere.write_text("keep me")
    (folder / name).symlink_to(elsewhere)
    result = subprocess.run([sys.executable, os.path.join(ROOT, "deploy", "credentials.py"), folder, "2"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert result.stderr.startswith(f"error: {folder / name} is already there, as a symbolic link")
    assert (elsewhere.read_text() == "keep me") if target == "a file" else not os.path.lexists(elsewhere)
    assert os.readlink(folder / name) == str(elsewhere)


def test_credentials_into_a_missing_folder_are_one_line(tmp_path):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "deploy", "credentials.py"), tmp_path / "missing", "1"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and result.stderr == (f"error: cannot write {tmp_path / 'missing' / 'ca.key'}: "
                                                        f"No such file or directory\n")
    assert not (tmp_path / "missing").exists()
