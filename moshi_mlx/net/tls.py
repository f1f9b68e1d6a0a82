"""HTTPS on a LAN without openssl: a self-signed certificate for this machine, made on first use.

Browsers give a page the microphone only on localhost or over https, so talking to a Moshi server
from a phone or another laptop needs TLS. ``local_web --ssl auto`` calls :func:`ensure_certificate`:
an ECDSA P-256 key and a self-signed certificate naming this machine (host names, ``localhost``, its
loopback and LAN addresses), kept in the user's config folder and reused while it still covers the
machine's current names and addresses. Its SHA-256 fingerprint is printed so the person accepting
the browser's warning (or passing ``--insecure`` to the terminal client) can check it is this one.

Where it lives: ``$MOSHI_MLX_CONFIG_DIR`` if set (tests), else ``~/Library/Application Support/moshi_mlx``
on macOS, else ``$XDG_CONFIG_HOME/moshi_mlx`` (default ``~/.config/moshi_mlx``); in its ``tls/``
subfolder, as ``cert.pem`` and ``key.pem`` (the layout ``--ssl DIR`` reads).
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import os
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

from ..errors import MoshiError
from ..places import config_dir

__all__ = [
    "CertInfo",
    "TlsError",
    "default_cert_dir",
    "machine_names",
    "machine_addresses",
    "ensure_certificate",
    "fingerprint",
    "server_context",
    "client_context",
]

CERT_FILE, KEY_FILE = "cert.pem", "key.pem"
VALID_DAYS = 397  # Apple's platforms refuse server certificates valid for longer than 398 days
RENEW_DAYS = 30  # make a new one when the old one has less than this left


def is_ip(name: str) -> bool:
    """True for an IPv4 or IPv6 literal (certificate names and the Host allow-list treat those apart)."""
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


class TlsError(MoshiError, RuntimeError):
    """A certificate problem, in one line for the user."""


@dataclass(frozen=True)
class CertInfo:
    cert: Path
    key: Path
    fingerprint: str  # SHA-256, colon-separated hex
    names: tuple[str, ...]
    addresses: tuple[str, ...]
    created: bool  # False: an existing certificate was reused


# ------------------------------------------------------------------------------------------------
# Where, and for which names
# ------------------------------------------------------------------------------------------------


def default_cert_dir() -> Path:
    """The certificate's folder: ``tls/`` in the user's config folder (moshi_mlx/places.py decides where)."""
    return config_dir() / "tls"


def machine_names() -> list[str]:
    """Names other devices may use for this machine: host name, its .local (mDNS) form, FQDN, localhost."""
    names: list[str] = []
    host = socket.gethostname().strip()
    if host:
        names.append(host)
        short = host.split(".")[0]
        names += [short, f"{short}.local"]  # macOS answers <name>.local on the LAN (Bonjour)
    try:
        fqdn = socket.getfqdn()
    except OSError:
        fqdn = ""
    if fqdn and fqdn not in ("localhost", "localhost.localdomain") and not is_ip(fqdn):
        names.append(fqdn)
    names.append("localhost")
    return list(dict.fromkeys(n.lower() for n in names if n))


def machine_addresses() -> list[str]:
    """Loopback plus the LAN addresses of this machine (IPv4 and IPv6, link-local left out)."""
    found: list[str] = ["127.0.0.1", "::1"]
    try:
        for *_, addr in socket.getaddrinfo(socket.gethostname(), None):
            found.append(str(addr[0]).split("%")[0])
    except OSError:
        pass
    # The address of the default route: connecting a UDP socket sends nothing, it only picks a route.
    for family, target in ((socket.AF_INET, "192.0.2.1"), (socket.AF_INET6, "2001:db8::1")):
        try:
            with socket.socket(family, socket.SOCK_DGRAM) as s:
                s.connect((target, 9))
                found.append(s.getsockname()[0])
        except OSError:
            pass
    keep = []
    for a in dict.fromkeys(found):
        try:
            ip = ipaddress.ip_address(a)
        except ValueError:
            continue
        if ip.is_link_local or ip.is_unspecified or ip.is_multicast:
            continue
        keep.append(str(ip))
    return keep


# ------------------------------------------------------------------------------------------------
# The certificate
# ------------------------------------------------------------------------------------------------


def fingerprint(cert_pem: bytes) -> str:
    """SHA-256 of the certificate's DER form, as ``AB:CD:...`` (what browsers show)."""
    der = ssl.PEM_cert_to_DER_cert(cert_pem.decode("ascii"))
    digest = hashlib.sha256(der).hexdigest().upper()
    return ":".join(digest[i : i + 2] for i in range(0, len(digest), 2))


def _covers(cert_path: Path, names: list[str], addresses: list[str]) -> bool:
    """True if the certificate at ``cert_path`` is ours to reuse: valid for a while and naming everything."""
    from cryptography import x509

    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (OSError, ValueError, x509.ExtensionNotFound):
        return False
    now = datetime.datetime.now(datetime.timezone.utc)
    if cert.not_valid_after_utc - now < datetime.timedelta(days=RENEW_DAYS):
        return False
    have_names = {n.lower() for n in san.get_values_for_type(x509.DNSName)}
    have_ips = {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}
    return set(names) <= have_names and set(addresses) <= have_ips


def _generate(names: list[str], addresses: list[str]) -> tuple[bytes, bytes]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, (names[0] if names else "localhost")[:64]),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "moshi_mlx (self-signed)"),
        ]
    )
    now = datetime.datetime.now(datetime.timezone.utc)
    san = [x509.DNSName(n) for n in names] + [x509.IPAddress(ipaddress.ip_address(a)) for a in addresses]
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))  # tolerate small clock differences
        .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
        .add_extension(x509.SubjectAlternativeName(san), critical=False)
        # A CA for itself only: OpenSSL (Python's --cafile) then accepts it as its own trust anchor.
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=False,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def _write_private(path: Path, data: bytes, mode: int) -> None:
    """Write via a temporary file and rename: a crash never leaves half a key behind."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def ensure_certificate(
    directory: str | os.PathLike | None = None,
    names: list[str] | None = None,
    addresses: list[str] | None = None,
) -> CertInfo:
    """The certificate in ``directory`` (default :func:`default_cert_dir`), made or renewed if needed.

    It is reused while it covers ``names`` and ``addresses`` (default: this machine's) and has more
    than 30 days left; otherwise a new key and certificate replace it.
    """
    try:
        import cryptography  # noqa: F401
    except ImportError:
        raise TlsError("--ssl auto needs the cryptography package: pip install cryptography") from None
    d = Path(directory) if directory is not None else default_cert_dir()
    names = [n.lower() for n in (names if names is not None else machine_names())]
    addresses = [str(ipaddress.ip_address(a)) for a in (addresses if addresses is not None else machine_addresses())]
    cert_path, key_path = d / CERT_FILE, d / KEY_FILE
    created = False
    if not (key_path.is_file() and _covers(cert_path, names, addresses)):
        try:
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
            cert_pem, key_pem = _generate(names, addresses)
            _write_private(key_path, key_pem, 0o600)
            _write_private(cert_path, cert_pem, 0o644)
        except OSError as e:
            raise TlsError(f"cannot write the certificate to {d}: {e.strerror or e}") from None
        created = True
    return CertInfo(cert_path, key_path, fingerprint(cert_path.read_bytes()), tuple(names), tuple(addresses), created)


# ------------------------------------------------------------------------------------------------
# SSL contexts
# ------------------------------------------------------------------------------------------------


def server_context(cert: str | os.PathLike, key: str | os.PathLike) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        ctx.load_cert_chain(str(cert), str(key))
    except (ssl.SSLError, OSError) as e:
        raise TlsError(f"could not load {cert} / {key}: {e}") from None
    return ctx


def client_context(insecure: bool = False, cafile: str | os.PathLike | None = None) -> ssl.SSLContext:
    """Verification as usual, or against ``cafile`` (e.g. the server's cert.pem), or none (``insecure``)."""
    if insecure:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return ctx
    if cafile is not None:
        path = Path(cafile)
        if not path.is_file():
            raise TlsError(f"--cafile {path}: no such file")
        try:
            return ssl.create_default_context(cafile=str(path))
        except (ssl.SSLError, ValueError) as e:
            raise TlsError(f"--cafile {path}: not a PEM certificate ({e})") from None
    return ssl.create_default_context()
