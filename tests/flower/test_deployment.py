"""The real thing: ``examples/flower`` on a SuperLink and two SuperNodes, separate processes on 127.0.0.1.

Every process this test starts runs in its own session (``start_new_session``), so its whole process group (the
SuperExec and app processes Flower spawns included) is stopped by the PID the test got, in ``finally``, also when
the test fails; afterwards no process of those groups may be left. Every listening socket of those processes must be
bound to 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
APP = ROOT / "examples" / "flower"
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _alive(pgids):
    import psutil

    left = []
    for p in psutil.process_iter(["pid", "status"]):
        try:
            if os.getpgid(p.pid) in pgids and p.info["status"] != psutil.STATUS_ZOMBIE:
                left.append(p.pid)
        except (ProcessLookupError, psutil.Error):
            pass
    return left


def _listening(pgids):
    import psutil

    addrs = []
    for c in psutil.net_connections(kind="inet"):
        if c.status == psutil.CONN_LISTEN and c.pid:
            try:
                if os.getpgid(c.pid) in pgids:
                    addrs.append(c.laddr.ip)
            except ProcessLookupError:
                pass
    return addrs


def _finished(report) -> bool:
    """The ServerApp rewrites its report every round ("status": "running"); finished when it says otherwise."""
    try:
        return json.loads(report.read_text())["status"] != "running"
    except (OSError, ValueError, KeyError):
        return False


def _stop(procs):
    for p in procs:
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    for p in procs:
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=10)


@pytest.mark.slow
def test_example_app_on_a_superlink_and_two_supernodes(tmp_path):
    pytest.importorskip("psutil")
    link, nodes = _free_port(), [_free_port(), _free_port()]
    home = tmp_path / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = ":local:"\n\n'
        f'[superlink.test]\naddress = "127.0.0.1:{link}"\ninsecure = true\n'
    )
    env = {**os.environ, "FLWR_HOME": str(home), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    logs = tmp_path / "logs"
    logs.mkdir()
    procs = []

    def start(name, *args):
        with open(logs / f"{name}.log", "w") as out:
            procs.append(subprocess.Popen([str(BIN / args[0]), *args[1:]], env=env, stdout=out,
                                          stderr=subprocess.STDOUT, start_new_session=True, cwd=tmp_path))

    report = tmp_path / "report.json"
    pgids = set()
    try:
        start("superlink", "flower-superlink", "--insecure", "--host", "127.0.0.1", "--port", str(link),
              "--disable-runtime-dependency-installation")
        for i, port in enumerate(nodes):
            start(f"supernode{i}", "flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{link}",
                  "--host", "127.0.0.1", "--port", str(port), "--node-config", f"partition-id={i} num-partitions=2")
        pgids = {p.pid for p in procs}
        time.sleep(3)
        run = subprocess.run(
            [str(BIN / "flwr"), "run", str(APP), "test", "--stream", "--run-config",
             f'report-path="{report}" num-server-rounds=1 num-partitions=2'],
            env=env, capture_output=True, text=True, timeout=480, cwd=tmp_path,
        )
        listening = _listening(pgids)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        deadline = time.monotonic() + 60  # the report is written by the ServerApp process after each round
        while not _finished(report) and time.monotonic() < deadline:
            time.sleep(1)
        assert report.exists(), (logs / "superlink.log").read_text()[-3000:]
        result = json.loads(report.read_text())
        assert result["engine"]["name"] == "flower"
        (round1,) = result["rounds"]
        assert round1["accepted"] == [0, 1] and round1["rejected"] == []  # every client trained
        assert sorted(map(int, round1["upload_bytes"])) == [0, 1]
        assert round1["without_personal"] == []
        assert len(result["accuracy"]) == 2 and all(0.0 <= a <= 1.0 for a in result["accuracy"])
        assert listening and set(listening) == {"127.0.0.1"}, listening
    finally:
        _stop(procs)
        time.sleep(1)
        assert _alive(pgids) == [], "processes left running"


@pytest.mark.slow
def test_example_app_with_flwr_run_in_the_local_simulation(tmp_path):
    """``flwr run examples/flower``: Flower starts a local SuperLink (simulation, 2 virtual SuperNodes) that outlives
    the command; the test finds it by its ``FLWR_HOME`` on the command line and stops it by PID."""
    psutil = pytest.importorskip("psutil")
    home = tmp_path / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text('[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = ":local:"\n')
    http, control = _free_port(), _free_port()
    env = {**os.environ, "FLWR_HOME": str(home), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(http), "FLWR_LOCAL_CONTROL_API_PORT": str(control),
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    report = tmp_path / "report.json"

    def started_here():
        found = []
        for p in psutil.process_iter(["pid", "cmdline"]):
            if any(str(home) in part for part in (p.info["cmdline"] or [])):
                found.append(p)
        return found

    try:
        run = subprocess.run(
            [str(BIN / "flwr"), "run", str(APP), "--stream", "--run-config",
             f'report-path="{report}" num-server-rounds=1'],
            env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path,
        )
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        deadline = time.monotonic() + 60
        while not _finished(report) and time.monotonic() < deadline:
            time.sleep(1)
        result = json.loads(report.read_text())
        (round1,) = result["rounds"]
        assert round1["accepted"] == [0, 1] and len(result["accuracy"]) == 2  # 2 virtual SuperNodes, both trained
    finally:
        procs = started_here()
        for p in procs:
            try:
                p.terminate()
            except psutil.Error:
                pass
        _, alive = psutil.wait_procs(procs, timeout=20)
        for p in alive:
            p.kill()
        deadline = time.monotonic() + 30  # children with --parent-pid exit on their own shortly after
        while time.monotonic() < deadline and [p for p in started_here() if p.status() != psutil.STATUS_ZOMBIE]:
            time.sleep(1)
        assert [p.pid for p in started_here() if p.status() != psutil.STATUS_ZOMBIE] == [], "processes left running"
