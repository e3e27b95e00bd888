"""Real processes on 127.0.0.1: a SuperNode killed with SIGKILL and restarted, and the server side killed and restarted.

``tests/flower/restart_app`` (FedPGP on a tiny ViT: a shared global prompt, personal U/V and head) runs on a real
SuperLink and two SuperNodes, each node with its own ``state-dir``. The app's server pauses after each round while
the test holds a gate file (``FEDPEFT_TEST_GATE``), so the test can kill and restart processes between two rounds.
The oracle is the in-process engine run on the same model, data and trainer without any interruption: the
per-client accuracies of every round must be equal (the engines are bit-identical, so any lost or reinitialised
personal state would show).

Every process is started in its own session and stopped by its process group id in ``finally``; afterwards none may
be left. Every listening socket of these processes must be on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

import pytest
from test_deployment import _free_port, _stop

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
APP = HERE / "restart_app"
BIN = Path(sys.executable).parent
sys.path.insert(0, str(APP))

pytestmark = pytest.mark.slow




class Cluster:
    """A SuperLink and SuperNodes as separate process groups, with their logs in ``tmp/logs``."""

    def __init__(self, tmp: Path) -> None:
        self.tmp, self.procs, self.pgids, self.starts = tmp, {}, set(), {}
        self.link = _free_port()
        self.home = tmp / "flwr-home"
        self.home.mkdir()
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = ":local:"\n\n'
            f'[superlink.test]\naddress = "127.0.0.1:{self.link}"\ninsecure = true\n')
        self.gate = tmp / "gate"
        self.gate.mkdir()
        self.logs = tmp / "logs"
        self.logs.mkdir()
        self.env = {**os.environ, "FLWR_HOME": str(self.home), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
                    "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
                    "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "FEDPEFT_TEST_GATE": str(self.gate)}

    def start(self, name: str, *args: str) -> subprocess.Popen:
        out = open(self.logs / f"{name}.log", "a")
        p = subprocess.Popen([str(BIN / args[0]), *args[1:]], env=self.env, stdout=out, stderr=subprocess.STDOUT,
                             start_new_session=True, cwd=self.tmp)
        out.close()
        self.procs[name] = p
        self.pgids.add(p.pid)
        return p

    def superlink(self) -> None:
        self.start("superlink", "flower-superlink", "--insecure", "--host", "127.0.0.1", "--port", str(self.link),
                   "--disable-runtime-dependency-installation", "--database", str(self.tmp / "superlink.db"))
        self.starts["link"] = self.starts.get("link", 0) + 1
        self.wait_log("superlink", "Uvicorn running", count=self.starts["link"])

    def wait_log(self, name: str, text: str, timeout: float = 120, count: int = 1) -> None:
        """Until ``text`` appears ``count`` times in the process's log."""
        deadline = time.monotonic() + timeout
        log = self.logs / f"{name}.log"
        while not log.exists() or log.read_text().count(text) < count:
            assert time.monotonic() < deadline, f"no {text!r} in {name}'s log\n" + self.tail()
            time.sleep(0.2)

    def supernode(self, i: int, num: int = 2) -> None:
        state = self.tmp / f"node{i}"
        self.start(f"supernode{i}", "flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{self.link}",
                   "--host", "127.0.0.1", "--port", str(_free_port()),
                   "--node-config", f'partition-id={i} num-partitions={num} state-dir="{state}"')
        self.wait_log(f"supernode{i}", "SuperNode ID", count=self.starts.get(i, 0) + 1)
        self.starts[i] = self.starts.get(i, 0) + 1

    def kill(self, name: str) -> None:
        """SIGKILL to the whole process group (the SuperNode or SuperLink and whatever it started)."""
        p = self.procs.pop(name)
        os.killpg(p.pid, signal.SIGKILL)
        p.wait(timeout=30)

    def run(self, name: str, **config) -> subprocess.Popen:
        cfg = " ".join(f"{k}={json.dumps(v)}" for k, v in config.items())
        return self.start(name, "flwr", "run", str(APP), "test", "--stream", "--run-config", cfg)

    def wait_gate(self, run: subprocess.Popen, round_: int, timeout: float = 300) -> None:
        """Until the server has finished round ``round_`` (0-based) and waits at the gate."""
        deadline = time.monotonic() + timeout
        while not (self.gate / f"done-{round_}").exists():
            assert run.poll() is None and time.monotonic() < deadline, self.tail()
            time.sleep(0.2)

    def open_gate(self, round_: int) -> None:
        (self.gate / f"go-{round_}").write_text("")

    def listening(self) -> List[str]:
        import psutil

        addrs = []
        for c in psutil.net_connections(kind="inet"):
            if c.status == psutil.CONN_LISTEN and c.pid:
                try:
                    if os.getpgid(c.pid) in self.pgids:
                        addrs.append(c.laddr.ip)
                except ProcessLookupError:
                    pass
        return addrs

    def alive(self) -> List[int]:
        import psutil

        left = []
        for p in psutil.process_iter(["pid", "status"]):
            try:
                if os.getpgid(p.pid) in self.pgids and p.info["status"] != psutil.STATUS_ZOMBIE:
                    left.append(p.pid)
            except (ProcessLookupError, psutil.Error):
                pass
        return left

    def tail(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-2500:]}" for p in sorted(self.logs.iterdir()))

    def stop(self) -> None:
        _stop(list(self.procs.values()))
        for pgid in self.pgids:  # children of killed groups (an app process) must not outlive the test
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _oracle(rounds: int):
    from restart_app.task import SEED, build_model, partition_data, protocol, trainer

    from fedpeft.protocols import Federation

    data = [partition_data(i) for i in range(2)]
    fed = Federation(protocol(), build_model(), [d[0] for d in data], test_data=[d[1] for d in data],
                     trainer=trainer(), seed=SEED)
    fed.run(rounds)
    return fed


def _finish(cluster: Cluster, run: subprocess.Popen, report: Path, rounds: int) -> Dict:
    assert run.wait(timeout=300) == 0, cluster.tail()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if report.exists() and len(json.loads(report.read_text())["rounds"]) == rounds:
            return json.loads(report.read_text())
        time.sleep(0.5)
    raise AssertionError(cluster.tail())


def test_a_supernode_and_then_the_server_side_killed_mid_run_give_the_uninterrupted_runs_results(tmp_path):
    """One federation, two crashes (one cluster keeps these real-process checks within CI's time budget):

    One message per round (the default): round r's record closes, and the gate opens, once round r + 1 has trained.

    1. when round 1's record closes (round 2 trained), ``kill -9`` SuperNode 1 and start it again (a new node id, the
       same ``state-dir``): at round 3's start the live server finds its old node silent, registers the new one
       (``rejoined``), and the client evaluates round 2's deployment and trains from its personal state on disk;
    2. when round 2's record closes (round 3 trained, its evaluation still open), ``kill -9`` the SuperLink with the
       ServerApp process it runs, start it again on the same database, ``flwr run`` again: the ServerApp resumes from
       its checkpoint (the same fedpeft run id, the open round in it) and sends round 3's deployment to be evaluated;
       the nodes re-register and evaluate from their files.

    Every round's per-client accuracies and the final server state equal the uninterrupted in-process run's.
    """
    pytest.importorskip("psutil")
    c = Cluster(tmp_path)
    report, ckpt = tmp_path / "report.json", tmp_path / "ckpt"
    config = {"report-path": str(report), "num-server-rounds": 3, "checkpoint-dir": str(ckpt), "probe-timeout": 5.0}
    try:
        c.superlink()
        c.supernode(0)
        c.supernode(1)
        first = c.run("run1", **config)
        c.wait_gate(first, 0)  # round 1 closed, round 2 trained
        saved = next((tmp_path / "node1").rglob("partition-1.safetensors")).read_bytes()
        c.kill("supernode1")  # its process group: the SuperNode, its SuperExec, any ClientApp process
        c.supernode(1)  # same node config and state-dir, a new node id
        c.open_gate(0)
        c.wait_gate(first, 1)  # round 2 closed, round 3 trained (and checkpointed, its evaluation open)
        before = json.loads((ckpt / "checkpoint.json").read_text())
        c.kill("superlink")  # the SuperLink and the ServerApp process it started
        first.wait(timeout=60)
        c.superlink()  # the same database: the SuperNodes reconnect
        second = c.run("run2", **config)
        c.wait_gate(second, 2)
        c.open_gate(2)
        result = _finish(c, second, report, 3)
        listening = c.listening()
    finally:
        c.stop()
        time.sleep(1)
        assert c.alive() == [], "processes left running"
    rounds = result["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2] and [r["accepted"] for r in rounds] == [[0, 1]] * 3
    assert rounds[2]["rejoined"] == [1] and "restarted_without_state" not in rounds[2]
    assert saved != next((tmp_path / "node1").rglob("partition-1.safetensors")).read_bytes()
    after = json.loads((ckpt / "checkpoint.json").read_text())
    assert before["round"] == 3 and before["meta"]["open"]["round"] == 2  # round 3 trained, not evaluated
    assert after["round"] == 3 and after["meta"]["open"] is None and after["run"] == before["run"]  # resumed
    fed = _oracle(3)
    assert [r["deployed"] for r in rounds] == [r.deployed for r in fed.history]
    assert result["accuracy"] == fed.history[-1].deployed

    import torch

    from fedpeft.protocols import load_checkpoint

    got = load_checkpoint(ckpt).tensors
    want = fed.server.state_dict()[0]
    assert all(torch.equal(got[f"server.{k}"], v) for k, v in want.items())
    assert listening and set(listening) == {"127.0.0.1"}, listening
