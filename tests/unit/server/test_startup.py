"""moshi_mlx.server.startup: the checks before the model loads (port, --ssl), said as one MoshiError line,
and the URLs the server announces."""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl

import pytest
from aiohttp import web

from moshi_mlx.errors import MoshiError, error_line
from moshi_mlx.local_web import main
from moshi_mlx.net import tls
from moshi_mlx.server.startup import (
    CannotListen,
    announce_lan,
    browser_url,
    check_port_free,
    folder_context,
    serve,
    ssl_setup,
)


def test_a_busy_port_is_a_one_line_error():
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        port = holder.getsockname()[1]
        with pytest.raises(CannotListen) as caught:
            check_port_free("127.0.0.1", port)
    assert isinstance(caught.value, MoshiError)
    assert error_line(caught.value) == (
        f"error: cannot listen on 127.0.0.1:{port}: Address already in use (is another server running? try --port)"
    )
    check_port_free("127.0.0.1", port)  # free again once the holder is gone
    check_port_free("127.0.0.1", 0)  # an ephemeral port is never checked


def test_a_port_taken_after_the_check_is_the_same_one_line_error():
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        port = holder.getsockname()[1]
        with pytest.raises(CannotListen, match=rf"^cannot listen on 127\.0\.0\.1:{port}: .*try --port\)$"):
            asyncio.run(serve(web.Application(), "127.0.0.1", port, None, open_browser=False))


def test_an_unknown_host_cannot_be_listened_on():
    with pytest.raises(CannotListen, match=r"^cannot listen on no-such-host\.invalid:8998: "):
        check_port_free("no-such-host.invalid", 8998)


def test_ssl_folder_without_files_says_how_to_make_them(tmp_path):
    with pytest.raises(tls.TlsError) as caught:
        folder_context(tmp_path)
    line = error_line(caught.value)
    assert line.startswith(f"error: --ssl {tmp_path}: {tmp_path / 'cert.pem'} not found; create a self-signed pair")
    assert f"-keyout {tmp_path / 'key.pem'} -out {tmp_path / 'cert.pem'}" in line


def test_unreadable_tls_files_exit_1_with_one_line(tmp_path, capsys):
    (tmp_path / "cert.pem").write_text("not a certificate\n")
    (tmp_path / "key.pem").write_text("not a key\n")
    assert main(["--demo", "--no-browser", "--port", "0", "--ssl", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    prefix = f"error: --ssl {tmp_path}: could not load {tmp_path / 'cert.pem'} / {tmp_path / 'key.pem'}: "
    assert err.startswith(prefix), err
    assert "SSLError" not in err and "OSError" not in err


def test_ssl_folder_with_a_real_pair_loads(tmp_path):
    info = tls.ensure_certificate(tmp_path, names=["localhost"], addresses=["127.0.0.1"])
    assert isinstance(folder_context(info.cert.parent), ssl.SSLContext)
    assert ssl_setup(str(tmp_path), "localhost")[1] is None  # nothing to announce for a folder
    assert ssl_setup(None, "localhost") == (None, None)


@pytest.mark.parametrize(
    "host, secure, url",
    [
        ("0.0.0.0", False, "http://localhost:8998/"),
        ("", True, "https://localhost:8998/"),
        ("::", False, "http://localhost:8998/"),
        ("192.168.1.5", True, "https://192.168.1.5:8998/"),
        ("fe80::1", False, "http://[fe80::1]:8998/"),
        ("[::1]", False, "http://[::1]:8998/"),
    ],
)
def test_browser_url(host, secure, url):
    assert browser_url(host, 8998, secure) == url


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.mark.parametrize(
    "host, shown",
    [
        ("localhost", []),
        ("0.0.0.0", ["https://192.168.1.5:8443/"]),
        ("::", ["https://192.168.1.5:8443/", "https://[fd00::5]:8443/"]),
        ("192.168.1.5", ["https://192.168.1.5:8443/"]),
    ],
)
def test_announce_lan(host, shown):
    handler, logger = Lines(), logging.getLogger("moshi_mlx.web")
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    try:
        announce_lan(host, 8443, ("127.0.0.1", "::1", "192.168.1.5", "fd00::5"))
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    urls = [line.split()[3] for line in handler.lines if line.startswith("from another device")]
    assert urls == shown
    if not shown:
        assert "cannot reach localhost" in handler.lines[0]


def test_a_plain_http_lan_server_says_where_and_that_browsers_refuse_the_microphone():
    """--host 0.0.0.0 without --ssl: the LAN addresses, and why talking from them needs --ssl auto."""
    assert ssl_setup(None, "127.0.0.1") == (None, None)
    ctx, announce = ssl_setup(None, "0.0.0.0")
    assert ctx is None and announce is not None
    handler, logger = Lines(), logging.getLogger("moshi_mlx.web")
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    try:
        announce_lan("0.0.0.0", 8998, ("127.0.0.1", "192.168.1.5"), secure=False)
        announce(8998)  # this machine's own addresses: whatever they are, no error
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    assert handler.lines[:2] == [
        "other devices' browsers allow the microphone only over https: restart with --ssl auto to talk from them",
        "from another device: http://192.168.1.5:8998/  (the page only, no microphone)",
    ]


def test_no_ipv6_is_skipped_by_errno_name_whatever_the_platforms_numbers(monkeypatch):
    """macOS says "no IPv6 here" with errno 49 (EADDRNOTAVAIL) where Linux says 99: the check must read the names.
    The socket layer is stood in (this Linux has its own numbers); macOS's values are put into `errno`."""
    import errno
    import types

    from moshi_mlx.server import startup

    monkeypatch.setattr(errno, "EADDRNOTAVAIL", 49)
    monkeypatch.setattr(errno, "EAFNOSUPPORT", 47)
    bound = []

    class Sock:
        def __init__(self, family, kind, proto):
            self.family = family

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def setsockopt(self, *a):
            pass

        def bind(self, addr):
            if self.family == socket.AF_INET6:
                raise OSError(49, "Can't assign requested address")
            bound.append(addr)

    infos = [(socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("::", 8998, 0, 0)),
             (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("0.0.0.0", 8998))]
    fake = types.SimpleNamespace(**{k: getattr(socket, k) for k in dir(socket) if k.isupper() or k == "gaierror"})
    fake.getaddrinfo = lambda *a, **k: infos
    fake.socket = Sock
    monkeypatch.setattr(startup, "socket", fake)
    check_port_free("", 8998)
    assert bound == [("0.0.0.0", 8998)]
