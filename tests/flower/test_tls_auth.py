"""TLS and SuperNode authentication for real: a SuperLink with TLS and ``--enable-supernode-auth``, two SuperNodes
with registered keys and one with an unregistered key, all on 127.0.0.1, certificates and keys made here.

What it shows (docs/flower.md, "On real machines"):

- a 2-round run of ``examples/flower`` completes over TLS with authenticated SuperNodes (the report has both
  partitions accepted in both rounds, and ``flwr ls`` says the run finished and completed);
- a SuperNode whose key was never registered is refused by the SuperLink (it never gets a node id and exits);
- ``flwr`` refuses a connection whose ``root-certificates`` is a relative path, and one without the CA (TLS really
  verifies the SuperLink's certificate);
- the safe layout: Flower 1.42 serves the Fleet, Control and Runtime APIs on one HTTP port and open-source Flower has
  no authentication for the Control API (run submission, key registration), so the SuperLink listens on 127.0.0.1
  and only ``/v1/fleet/`` is reachable from the nodes' side, through a TLS reverse proxy (here :class:`FleetGate`
  on 127.0.0.2, standing for the machine's public address; nginx in production, docs/flower.md). The SuperNodes
  connect through it, while ``flwr run`` and ``flwr supernode register`` through it are refused (HTTP 403); the
  operator reaches the Control API on loopback.

Every process runs in its own session and is stopped by its PID's process group in ``finally``.
"""

from __future__ import annotations

import datetime as dt
import http.client
import http.server
import ipaddress
import json
import os
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_deployment import _alive, _free_port, _listening, _stop

ROOT = Path(__file__).resolve().parents[2]
APP = ROOT / "examples" / "flower"
BIN = Path(sys.executable).parent


def make_ca_and_server_cert(folder: Path) -> tuple:
    """A CA and a server certificate for 127.0.0.1 / localhost signed by it: ``(ca.crt, server.pem, server.key)``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.timezone.utc)

    def key():
        return ec.generate_private_key(ec.SECP256R1())

    def pem_key(k, path):
        path.write_bytes(k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption()))

    ca_key = key()
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedpeft-test-ca")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
          .not_valid_after(now + dt.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    srv_key = key()
    srv = (x509.CertificateBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
           .issuer_name(ca_name).public_key(srv_key.public_key()).serial_number(x509.random_serial_number())
           .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
           .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                                       x509.IPAddress(ipaddress.ip_address("127.0.0.2")),
                                                       x509.DNSName("localhost")]), critical=False)
           .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
           .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
           .sign(ca_key, hashes.SHA256()))
    paths = folder / "ca.crt", folder / "server.pem", folder / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(srv.public_bytes(serialization.Encoding.PEM))
    pem_key(srv_key, paths[2])
    return paths


def make_node_key(folder: Path, name: str) -> tuple:
    """An ECDSA (P-384) key pair in OpenSSH format, as ``ssh-keygen -t ecdsa -b 384`` writes it: ``(key, key.pub)``."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    k = ec.generate_private_key(ec.SECP384R1())
    priv, pub = folder / name, folder / f"{name}.pub"
    priv.write_bytes(k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                     serialization.NoEncryption()))
    priv.chmod(0o600)
    pub.write_bytes(k.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))
    return priv, pub


class FleetGate:
    """A TLS reverse proxy that passes only ``POST /v1/fleet/...`` to the SuperLink and answers 403 to the rest.

    It terminates TLS with the SuperLink's own certificate and forwards each request over a verified TLS connection to
    the SuperLink on loopback. The same rule as the nginx ``location /v1/fleet/`` block of docs/flower.md.
    """

    def __init__(self, host: str, upstream_port: int, cert: Path, key: Path, ca: Path) -> None:
        upstream = ssl.create_default_context(cafile=str(ca))
        gate = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if not self.path.startswith("/v1/fleet/"):
                    gate.refused.append(self.path)
                    msg = b"forbidden: only the Fleet API is served here"
                    self.send_response(403)
                    self.send_header("Content-Length", str(len(msg)))
                    self.end_headers()
                    self.wfile.write(msg)
                    return
                gate.passed.append(self.path)
                conn = http.client.HTTPSConnection("127.0.0.1", upstream_port, context=upstream, timeout=120)
                hop = {"host", "connection", "keep-alive", "transfer-encoding", "content-length"}
                headers = {k: v for k, v in self.headers.items() if k.lower() not in hop}
                conn.request("POST", self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                conn.close()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in hop | {"date", "server"}:
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST

        self.refused: list = []
        self.passed: list = []
        self.server = http.server.ThreadingHTTPServer((host, 0), Handler)
        self.server.daemon_threads = True
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(cert), str(key))
        self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
        self.address = f"{host}:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FleetGate:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)


def _finished(report: Path) -> bool:
    """The ServerApp rewrites its report every round ("status": "running"); finished when it says otherwise."""
    try:
        return json.loads(report.read_text())["status"] != "running"
    except (OSError, ValueError, KeyError):
        return False


def _wait_for(pred, timeout: float, poll: float = 0.5) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(poll)
    return pred()


@pytest.mark.slow
def test_tls_and_node_auth_run_and_refusals(tmp_path):
    pytest.importorskip("psutil")
    pytest.importorskip("cryptography")
    pki = tmp_path / "pki"
    pki.mkdir()
    ca, cert, key = make_ca_and_server_cert(pki)
    nodes = [make_node_key(pki, f"node{i}") for i in range(2)]
    stranger, stranger_pub = make_node_key(pki, "stranger")  # never registered
    link = _free_port()
    home = tmp_path / "flwr-home"
    home.mkdir()
    env = {**os.environ, "FLWR_HOME": str(home),
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env.pop("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", None)  # the SuperLink flag alone must be enough
    logs = tmp_path / "logs"
    logs.mkdir()
    procs, pgids = [], set()

    def start(name, *args):
        with open(logs / f"{name}.log", "w") as out:
            p = subprocess.Popen([str(BIN / args[0]), *args[1:]], env=env, stdout=out, stderr=subprocess.STDOUT,
                                 start_new_session=True, cwd=tmp_path)
        procs.append(p)
        pgids.add(p.pid)
        return p

    def flwr(*args, timeout=120):
        return subprocess.run([str(BIN / "flwr"), *args], env=env, capture_output=True, text=True, timeout=timeout,
                              cwd=tmp_path)

    report = tmp_path / "report.json"
    try:
        start("superlink", "flower-superlink", "--ssl-ca-certfile", str(ca), "--ssl-certfile", str(cert),
              "--ssl-keyfile", str(key), "--enable-supernode-auth", "--host", "127.0.0.1", "--port", str(link),
              "--disable-runtime-dependency-installation")
        with FleetGate("127.0.0.2", link, cert, key, ca) as gate:
            (home / "config.toml").write_text(
                f'[superlink]\ndefault = "tls"\n\n'
                f'[superlink.tls]\naddress = "127.0.0.1:{link}"\nroot-certificates = "{ca}"\n\n'
                f'[superlink.outside]\naddress = "{gate.address}"\nroot-certificates = "{ca}"\n\n'
                f'[superlink.relative]\naddress = "127.0.0.1:{link}"\nroot-certificates = "pki/ca.crt"\n\n'
                f'[superlink.no-ca]\naddress = "127.0.0.1:{link}"\n'
            )

            def supernode(name, private_key, pid):
                return start(name, "flower-supernode", "--root-certificates", str(ca), "--superlink", gate.address,
                             "--auth-supernode-private-key", str(private_key), "--host", "127.0.0.1",
                             "--port", str(_free_port()), "--node-config", f"partition-id={pid} num-partitions=2",
                             "--max-retries", "2", "--max-wait-time", "20")

            # the operator registers the two nodes' public keys on loopback (Control API, over TLS)
            assert _wait_for(lambda: flwr("supernode", "ls", "tls", timeout=60).returncode == 0, 60), \
                (logs / "superlink.log").read_text()[-3000:]
            for _, pub in nodes:
                reg = flwr("supernode", "register", str(pub), "tls")
                assert reg.returncode == 0, reg.stdout + reg.stderr
            # from the nodes' side, the Control API is out of reach: registering a key and submitting a run fail
            outside_reg = flwr("supernode", "register", str(stranger_pub), "outside")
            assert outside_reg.returncode != 0, outside_reg.stdout
            outside_run = flwr("run", str(APP), "outside", "--run-config", "num-server-rounds=1")
            assert "/v1/control/register-node" in gate.refused and \
                any(p.startswith("/v1/control/") and p != "/v1/control/register-node" for p in gate.refused), \
                (gate.refused, outside_run.stdout[-2000:])
            # TLS is verified: a relative CA path is refused by flwr, and without the CA the handshake fails
            rel = flwr("ls", "relative")
            assert rel.returncode != 0 and "absolute" in (rel.stdout + rel.stderr), rel.stdout + rel.stderr
            no_ca = flwr("ls", "no-ca")
            assert no_ca.returncode != 0, no_ca.stdout

            intruder = supernode("stranger", stranger, 1)
            for i, (priv, _) in enumerate(nodes):
                supernode(f"supernode{i}", priv, i)
            # the unregistered key is refused: the SuperLink answers 412 and the SuperNode exits (code 305)
            assert _wait_for(lambda: intruder.poll() is not None, 90), "the unregistered SuperNode is still running"
            assert intruder.returncode != 0
            assert "Failed to activate SuperNode" in (logs / "stranger.log").read_text()
            link_log = (logs / "superlink.log").read_text()
            assert "No SuperNode found with the given public key" in link_log
            assert '"POST /v1/fleet/activate-node HTTP/1.1" 412' in link_log

            run = flwr("run", str(APP), "tls", "--stream", "--run-config",
                       f'report-path="{report}" num-server-rounds=2 num-partitions=2', timeout=420)
            listening = _listening(pgids)
            assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
            assert _wait_for(lambda: _finished(report), 60), (logs / "superlink.log").read_text()[-3000:]
            assert any(p == "/v1/fleet/push-messages" for p in gate.passed)  # the nodes worked through the gate
        result = json.loads(report.read_text())
        assert result["status"] == "completed"
        assert [r["round"] for r in result["rounds"]] == [0, 1]  # the protocol's round index (0-based)
        for r in result["rounds"]:
            assert r["accepted"] == [0, 1] and not r["rejected"], r
        assert len(result["accuracy"]) == 2 and all(0.0 <= a <= 1.0 for a in result["accuracy"])
        runs = flwr("ls", "tls", "--format", "json")  # one run (the refused one never got in), completed
        assert runs.returncode == 0, runs.stdout + runs.stderr
        listed = json.loads(runs.stdout)["runs"]
        assert len(listed) == 1 and listed[0]["status"] == "finished:completed", listed
        assert listening and set(listening) == {"127.0.0.1"}, listening
    finally:
        _stop(procs)
        time.sleep(1)
        assert _alive(pgids) == [], "processes left running"
