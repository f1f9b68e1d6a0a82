"""moshi_mlx.net.tls: the --ssl auto certificate (made, reused, renewed) and the client/server SSL contexts,
checked with a real TLS handshake; the benchmark script of the client path, run briefly."""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import sys
import threading

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from moshi_mlx.net import tls
from tests.helpers.audio_env import ROOT, base_env


def _handshake(info: tls.CertInfo, ctx: ssl.SSLContext, server_hostname: str) -> bytes:
    """One TLS connection to a one-shot server using ``info``; returns what the server sent."""
    sctx = tls.server_context(info.cert, info.key)
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)

    def serve():
        conn, _ = srv.accept()
        try:
            with sctx.wrap_socket(conn, server_side=True) as s:
                s.sendall(b"ok")
        except (ssl.SSLError, OSError):
            pass

    th = threading.Thread(target=serve, daemon=True)
    th.start()
    try:
        with socket.create_connection(srv.getsockname(), timeout=10) as raw:
            with ctx.wrap_socket(raw, server_hostname=server_hostname) as s:
                return s.recv(2)
    finally:
        th.join(5)
        srv.close()


def test_certificate_made_reused_and_renewed(tmp_path):
    d = tmp_path / "tls"
    a = tls.ensure_certificate(d, names=["studio.local", "localhost"], addresses=["127.0.0.1", "192.168.1.20"])
    assert a.created and (d / "cert.pem").is_file() and (d / "key.pem").stat().st_mode & 0o777 == 0o600
    cert = x509.load_pem_x509_certificate((d / "cert.pem").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"studio.local", "localhost"}
    assert {str(ip) for ip in san.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "192.168.1.20"}
    assert a.fingerprint == cert.fingerprint(hashes.SHA256()).hex(":").upper()  # what browsers display
    assert (cert.not_valid_after_utc - cert.not_valid_before_utc).days <= 398

    b = tls.ensure_certificate(d, names=["localhost"], addresses=["127.0.0.1"])  # a subset: reused
    assert not b.created and b.fingerprint == a.fingerprint
    c = tls.ensure_certificate(d, names=["localhost"], addresses=["10.0.0.7"])  # the machine moved: renewed
    assert c.created and c.fingerprint != a.fingerprint


def test_contexts_trust_only_what_they_should(tmp_path):
    info = tls.ensure_certificate(tmp_path, names=["localhost"], addresses=["127.0.0.1"])
    assert _handshake(info, tls.client_context(cafile=info.cert), "127.0.0.1") == b"ok"
    assert _handshake(info, tls.client_context(cafile=info.cert), "localhost") == b"ok"
    assert _handshake(info, tls.client_context(insecure=True), "127.0.0.1") == b"ok"
    with pytest.raises(ssl.SSLCertVerificationError, match="self-signed certificate"):
        _handshake(info, tls.client_context(), "127.0.0.1")
    with pytest.raises(ssl.SSLCertVerificationError, match="mismatch"):
        _handshake(info, tls.client_context(cafile=info.cert), "elsewhere.example")
    with pytest.raises(tls.TlsError, match="no such file"):
        tls.client_context(cafile=tmp_path / "nope.pem")


def test_cert_dir_is_tls_in_the_config_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("MOSHI_MLX_CONFIG_DIR", str(tmp_path / "explicit"))
    assert tls.default_cert_dir() == tmp_path / "explicit" / "tls"


def test_machine_addresses_are_addresses():
    import ipaddress

    addrs = tls.machine_addresses()
    assert "127.0.0.1" in addrs and all(ipaddress.ip_address(a) for a in addrs)
    assert "localhost" in tls.machine_names()


def test_client_path_benchmark_runs(tmp_path):
    out = tmp_path / "bench.json"
    r = subprocess.run(
        [sys.executable, "benchmarks/bench_client.py", "--frames", "12", "--json", str(out)],
        cwd=ROOT, env=base_env(), capture_output=True, text=True, timeout=120,
    )
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    assert res["frames_sent"] == 12 and res["frames_received"] >= 10 and res["frames_dropped"] == 0, res
    assert res["latency_ms"]["median"] > 0 and "| latency median |" in r.stdout
