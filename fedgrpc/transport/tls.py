"""TLS for both sides: certificate material from files, whether a peer speaks TLS at all, and the binding of a
secret to the client certificate it was first used with."""

from __future__ import annotations

import hashlib
import socket
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path

import grpc

from fedgrpc.transport.rpc import parse_address


@dataclass(frozen=True)
class Tls:
    """PEM bytes for TLS: our certificate and key (to serve, or as a client certificate) and the CA peers must chain to."""

    cert: bytes | None = None
    key: bytes | None = None
    ca: bytes | None = None

    @classmethod
    def from_files(cls, cert: str | None, key: str | None, ca: str | None) -> Tls | None:
        """Read --tls-cert, --tls-key and --tls-ca; None when none is given."""
        if bool(cert) != bool(key):
            raise ValueError("--tls-cert and --tls-key go together")
        if not (cert or ca):
            return None
        return cls(*(_read_pem(flag, path) for flag, path in (("--tls-cert", cert), ("--tls-key", key), ("--tls-ca", ca))))

    @property
    def serving(self) -> bool:
        """Whether we hold a certificate and key to serve TLS with."""
        return self.cert is not None and self.key is not None

    def server_credentials(self) -> grpc.ServerCredentials:
        """TLS for our server; with a CA, clients must present a certificate it signed (mutual TLS)."""
        return grpc.ssl_server_credentials([(self.key, self.cert)], root_certificates=self.ca, require_client_auth=self.ca is not None)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """TLS for our calls: the peer must chain to our CA; we present our certificate when we hold one."""
        return grpc.ssl_channel_credentials(root_certificates=self.ca, private_key=self.key, certificate_chain=self.cert)


def _read_pem(flag: str, path: str | None) -> bytes | None:
    if not path:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise ValueError(f"cannot read {flag} {path}: {error.strerror}") from None


def peer_certificate(context: grpc.ServicerContext) -> str | None:
    """SHA-256 (hex) of the client certificate the caller presented over mutual TLS, or None without one."""
    presented = context.auth_context().get("x509_pem_cert")
    return hashlib.sha256(presented[0]).hexdigest() if presented else None


class CertificateBinding:
    """The client certificate the first caller with a secret presented; later callers with it must present the same.

    A learner binds its leader this way, so that its callback secret, if it leaked, is no good without the
    leader's certificate too.
    """

    def __init__(self) -> None:
        self._bound: str | None = None
        self._lock = threading.Lock()

    def check(self, context: grpc.ServicerContext) -> None:
        """Abort the call (UNAUTHENTICATED) when it presents another certificate than the bound one."""
        presented = peer_certificate(context)
        with self._lock:
            if self._bound is None:
                self._bound = presented
            bound = self._bound
        if bound is not None and presented != bound:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "another client certificate than this learner's leader presented")


TLS_PROBE_S = 3.0  # a TLS handshake on loopback or a LAN takes milliseconds


def speaks_tls(address: str, timeout: float = TLS_PROBE_S) -> bool | None:
    """Whether the server at `address` answers a TLS handshake: True, False (it answers, not in TLS), or None
    (nothing answers there). A server that wants a client certificate counts: it answers with TLS's own alert."""
    try:
        host, port = parse_address(address)
        raw = socket.create_connection((host.strip("[]"), port), timeout=timeout)
    except (OSError, ValueError):
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # only whether it speaks TLS at all: no trust is placed in the answer
    context.set_alpn_protocols(["h2"])
    try:
        with context.wrap_socket(raw, server_hostname=host.strip("[]")):
            return True
    except ssl.SSLError as error:
        return "ALERT" in str(error.reason or "")  # a TLS server refusing us; anything else is another protocol
    except OSError:  # closed or reset at the first TLS bytes: a plaintext HTTP/2 server
        return False
    finally:
        raw.close()


def tls_mismatch(address: str, ours: bool, side: str, theirs: bool | None = None) -> str | None:
    """Why this side and the `side` at `address` cannot talk (one speaks TLS, the other not), or None.

    `theirs`: what a probe of `address` already found (speaks_tls); None probes it now.
    """
    theirs = speaks_tls(address) if theirs is None else theirs
    if theirs is None or theirs == ours:
        return None
    if theirs:
        return f"the {side} at {address} speaks TLS and this side does not: add --tls-ca (and --tls-cert and --tls-key under mutual TLS)"
    return f"the {side} at {address} does not speak TLS and this side does: drop the --tls-* flags here, or give the {side} --tls-cert and --tls-key"
