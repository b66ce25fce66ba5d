"""`scanpay cluster up|status|down` end to end in a temp dir (free ports),
as an operator runs them; writes through the admin CLI's `--connect` with
several addresses; the one-line refusals (a taken port, a directory in
use or holding something else, no cluster)."""
import io
import json
import os
import re
import socket
import subprocess
import sys
import time

import pytest

from engine import cli
from engine.cli import admin, cluster as cluster_cli
from engine.client import Client
from engine.demo import story
from engine.replication.cluster import LocalCluster, process_start_ticks
from support import ROOT

LEASE_MS = 1500
CHECKPOINT_EVERY = 4
WRITES = 10
STATUS_TIMEOUT_S = 60


def scanpay(*argv, timeout_s: float = 180, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "engine.cli", *argv], cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": ROOT, **env}, capture_output=True,
                          text=True, timeout=timeout_s)


def flat(text: str) -> str:
    """rich's tables as plain words: borders gone, wrapped cells joined."""
    return " ".join(text.translate(str.maketrans("│┃┌┐└┘├┤─━┏┓┗┛┡┩╇╋┳┻", " " * 20)).split())


def in_process(*argv) -> tuple[int, str, str]:
    """`scanpay cluster ARGV` in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    code = cluster_cli.run(cli.build_parser().parse_args(["cluster", *argv]), out, err)
    return code, out.getvalue(), err.getvalue()


def status_json(directory) -> tuple[int, dict]:
    code, out, _ = in_process("status", "--dir", str(directory), "--json")
    return code, json.loads(out)


@pytest.fixture
def cluster_dir(tmp_path):
    directory = tmp_path / "cluster"
    yield directory
    if (directory / "cluster.json").exists():
        LocalCluster.load(str(directory)).down()        # by pid, whatever the test did


def write_merchants(addresses: str, tmp_path, first_id: int, count: int) -> None:
    """`scanpay merchants --file F --connect A,B,..` in process."""
    path = tmp_path / f"merchants{first_id}.json"
    path.write_text(json.dumps([{"id": first_id + i} for i in range(count)]))
    out, err = io.StringIO(), io.StringIO()
    args = cli.build_parser().parse_args(["merchants", "--file", str(path), "--connect", addresses])
    assert admin.run(args, stdout=out, stderr=err) == 0, err.getvalue()
    assert f"{count} ok" in out.getvalue()


def wait_status(directory, settled, nudge=None) -> dict:
    """Until `settled(status)` holds: that status. `nudge()` between looks:
    a leader appends a checkpoint record with its next append, so an idle
    one may keep its last digest to itself (engine/replication/node.py)."""
    deadline = time.monotonic() + STATUS_TIMEOUT_S
    while True:
        code, view = status_json(directory)
        if settled(view):
            return view
        assert time.monotonic() < deadline, view
        if nudge is not None:
            nudge()
        time.sleep(0.2)


def caught_up(view: dict) -> bool:
    point = view["checkpoint"]
    return (view["healthy"] and all(n["lag"] == 0 for n in view["nodes"])
            and point is not None and len(point["digests"]) == 3 and point["agree"])


def test_cluster_up_status_down_in_a_temp_dir(cluster_dir, tmp_path):
    up = scanpay("cluster", "up", "--nodes", "3", "--dir", str(cluster_dir), "--base-port", "0",
                 "--lease-ms", str(LEASE_MS), "--checkpoint-every", str(CHECKPOINT_EVERY))
    assert up.returncode == 0, up.stderr
    assert up.stdout.count(" leader ") == 1 and up.stdout.count(" follower ") == 2, up.stdout
    code, view = status_json(cluster_dir)
    assert code == 0 and view["healthy"], view
    roles = sorted(n["role"] for n in view["nodes"])
    assert roles == ["follower", "follower", "leader"]
    leader = next(n for n in view["nodes"] if n["role"] == "leader")
    assert view["lease"]["holder"]["address"] == leader["address"]
    assert view["lease"]["holder"]["pid"] == leader["pid"]
    assert sum(s["stream_leader"] for s in view["nats"]) == 1
    assert all(isinstance(n["lag"], int) and n["lag"] >= 0 for n in view["nodes"])
    followers = ",".join(n["address"] for n in view["nodes"] if n["role"] == "follower")
    write_merchants(followers, tmp_path, 1, 1)          # the client finds the leader
    with Client.connect(view["addresses"]) as client:       # several addresses: the leader
        for i in range(WRITES):
            client.call("MERCHANTS", {"merchants": [{"id": 100 + i}]})
        view = wait_status(cluster_dir, caught_up,      # an upsert that changes nothing
                           lambda: client.call("MERCHANTS", {"merchants": [{"id": 100}]}))
    assert view["stream"]["last_seq"] > WRITES
    assert {n["stream_seq"] for n in view["nodes"]} == {view["stream"]["last_seq"]}
    assert view["checkpoint"]["seq"] >= CHECKPOINT_EVERY
    text = in_process("status", "--dir", str(cluster_dir))[1]
    assert "digests agree (s1, s2, s3)" in text and "healthy" in text, text
    code, _, err = in_process("up", "--dir", str(cluster_dir), "--base-port", "0")
    assert code == 2 and "a cluster runs in" in err and err.count("\n") == 1, err
    demo = scanpay("demo", "--cluster", "--connect", view["addresses"], "--payments", "2000",
                   "--users", "100", "--report", "")
    out = flat(demo.stdout)
    assert demo.returncode == 0, out[-2000:] + demo.stderr
    assert "no test clock" in out and "leader killed no (--connect" in out
    assert "which one paid off" not in out          # no story without the eight weeks
    assert "3 nodes agree" in out and "FAILED" not in out
    pids = [m["pid"] for m in view["nodes"]] + [s["pid"] for s in view["nats"]]
    down = scanpay("cluster", "down", "--dir", str(cluster_dir))
    assert down.returncode == 0 and down.stdout.count("stopped (pid") == 6, down.stdout
    assert all(process_start_ticks(pid) is None for pid in pids)
    code, view = status_json(cluster_dir)
    assert code == 1 and view["problems"] == ["down: no process of it runs"]


def listening_below(port_max: int) -> socket.socket:
    """A socket listening on a port under `port_max` (a base port needs room above it)."""
    for _ in range(100):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        if s.getsockname()[1] < port_max:
            s.listen()
            return s
        s.close()
    raise AssertionError("no port below {port_max} in 100 tries")


def test_up_refuses_a_taken_port_and_starts_nothing(tmp_path):
    with listening_below(60_000) as taken:
        port = taken.getsockname()[1]
        code, _, err = in_process("up", "--dir", str(tmp_path / "c"), "--base-port", str(port))
    assert code == 2, err
    assert f"port {port} on 127.0.0.1 is taken" in err and err.count("\n") == 1
    assert not (tmp_path / "c" / "cluster.json").exists()


def test_up_refuses_a_directory_holding_something_else(tmp_path):
    (tmp_path / "mine.txt").write_text("not a cluster")
    code, _, err = in_process("up", "--dir", str(tmp_path), "--base-port", "0")
    assert code == 2 and "is not empty and holds no cluster" in err, err
    assert (tmp_path / "mine.txt").read_text() == "not a cluster"
    code, _, err = in_process("up", "--dir", str(tmp_path / "mine.txt" / "c"), "--base-port", "0")
    assert code == 2 and "give a --dir this user may write" in err and err.count("\n") == 1


def test_status_and_down_without_a_cluster_say_how_to_start_one(tmp_path):
    for action in ("status", "down"):
        code, _, err = in_process(action, "--dir", str(tmp_path))
        assert code == 2, err
        assert f"no cluster in {tmp_path}" in err and "cluster up" in err


def test_demo_cluster_tells_the_story_kills_the_leader_and_loses_no_answered_payment(tmp_path):
    """`scanpay demo --cluster`, small: its own cluster, the single-node
    demo's story (eight weeks of mall visits, two targeted campaigns, the
    verdicts by LIFT read from a follower), the leader killed mid-weekend;
    the exit code is 0 only when every check of the demo holds. The server
    draws each holdout from the OS CSPRNG (10 %): at 3,000 shoppers the
    lapsed segment has about 100 members, and an empty holdout (0.9 ** 100)
    is rarer than 1 in 30,000. At 500 it had 21, and 1 run in 9 had none."""
    report = tmp_path / "report"
    done = scanpay("demo", "--cluster", "--payments", "20000", "--users", "3000", "--report",
                   str(report), TMPDIR=str(tmp_path))
    out = flat(done.stdout)
    assert done.returncode == 0, out[-3000:] + done.stderr
    history = int(re.search(r"eight weeks before the weekend: ([\d,]+) payments at the mall "
                            r"\(over the wire", out).group(1).replace(",", ""))
    assert history > 0, out[:3000]
    for t in story.TARGETED:                        # sent to their segments, with a holdout
        assert re.search(re.escape(t.name) + r": [\d,]+ shoppers in the segment, [1-9][\d,]* "
                         r"coupons issued, [1-9][\d,]* held out", out), out[:3000]
    # The follower has applied at least the leader's last write (a record
    # the leader appends after it, such as a checkpoint, may be there too).
    read = re.search(r"report read from follower \S+ at stream seq ([\d,]+) \(the leader's "
                     r"last write: ([\d,]+)\)", out)
    assert read, out[:4000]
    follower_seq, last_write = (int(g.replace(",", "")) for g in read.groups())
    assert follower_seq >= last_write > 0, read.group(0)
    assert "Targeted campaigns: which one paid off?" in out and "paid off: " in out
    lift = (report / "lift.csv").read_text().splitlines()
    assert len(lift) == 3
    assert all(row.startswith(t.name) for row, t in zip(lift[1:], story.TARGETED)), lift
    assert "SIGKILL, after" in out and "killed node started again; follows" in out, out[-3000:]
    assert "AUDIT: ok" in out and "FAILED" not in out
    assert "3 nodes agree" in out
    assert os.listdir(tmp_path) == ["report"]       # the cluster's directory is removed
