"""Provisioning a mutual-TLS federation: a private CA, each machine's certificate, key and enrolment secret, and its command.

    python -m fedgrpc.provision federation --leader leader.example.org --learner site-a=10.0.0.5 --learner site-b=site-b.example.org

Each machine gets a folder (`federation/leader/`, `federation/site-a/`, ...) to copy to it; the CA's key stays in
`federation/ca/`, off the machines, for signing the certificates of machines added later.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import re
import secrets
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

LEADER = "leader"  # the leader's folder, so no learner may take the name
CA_FOLDER = "ca"  # holds the CA's key, which must never be copied to a machine, so no learner may take the name either
MACHINE_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # a folder name on any system; 64: the longest common name X.509 allows
HOST_LABEL = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")  # one label of a DNS host name
MAX_HOST_NAME_CHARS = 253  # DNS's limit on a whole name
MAX_PORT = 65535
DEFAULT_PORT = 10134  # leader.py's default --port
DEFAULT_LEARNER_PORT = 10135  # learners listen on a fixed port, so that firewalls can open it to the leader's calls
DEFAULT_DAYS = 365
MAX_DAYS = 36500  # a century: far enough, and within the dates X.509 and datetime can hold
CLOCK_SKEW = datetime.timedelta(minutes=5)  # valid from a little before now, for machines whose clocks run behind
CA_COMMON_NAME = "fedgrpc federation CA"
# machine folders and keys are the owner's alone; certificates are public
PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600
PUBLIC_FILE_MODE = 0o644


@dataclass(frozen=True)
class Machine:
    """One machine of the federation: its folder's name and the host names and IP addresses others dial it at."""

    name: str
    hosts: tuple[str, ...]


@dataclass(frozen=True)
class Plan:
    """What to make: where, for which machines, with which ports and lifetime."""

    out_dir: Path
    leader: Machine
    learners: tuple[Machine, ...]
    port: int
    learner_port: int
    days: int


class Parser(argparse.ArgumentParser):
    """argparse whose refusals are one line on stderr and exit status 2."""

    def error(self, message: str) -> NoReturn:
        """Print `prog: error: message` alone, without the usage block."""
        self.exit(2, f"{self.prog}: error: {message}\n")


def bounded_int(low: int, high: int) -> Callable[[str], int]:
    """An argparse type: a whole number from `low` to `high`."""

    def parse(text: str) -> int:
        if not (text.isascii() and text.isdigit()) or not low <= int(text) <= high:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number from {low} to {high}")
        return int(text)

    return parse


def parse_hosts(text: str) -> tuple[str, ...]:
    """Comma-separated host names and IP addresses, checked, IPs in canonical form, repeats dropped."""
    hosts: list[str] = []
    for host in text.split(","):
        host = host.strip().removeprefix("[").removesuffix("]")
        try:
            host = str(ipaddress.ip_address(host))
        except ValueError:
            labels = host.removesuffix(".").split(".")
            if len(host) > MAX_HOST_NAME_CHARS or not all(HOST_LABEL.fullmatch(label) for label in labels):
                raise ValueError(f"{host!r} is neither a host name nor an IP address") from None
        if host not in hosts:
            hosts.append(host)
    return tuple(hosts)


def parse_learner(text: str, taken: set[str]) -> Machine:
    """One --learner NAME=HOST[,HOST...], refused when the name is not plain, is reserved or is in `taken`."""
    name, _, hosts = text.partition("=")
    if not MACHINE_NAME.fullmatch(name):
        raise ValueError(f"--learner {text!r}: the name must be letters, digits, - and _ (at most 64), then =HOST[,HOST...]")
    if name.casefold() in (LEADER, CA_FOLDER):
        raise ValueError(f"--learner {name}: {name!r} is taken by the {LEADER} folder or the CA's folder; choose another name")
    if name.casefold() in taken:  # casefolded: on macOS and Windows, site-a and Site-A are one folder
        raise ValueError(f"--learner {name}: the name is given twice")
    if not hosts.strip():
        raise ValueError(f"--learner {name}: needs its host names or IP addresses, as {name}=HOST[,HOST...]")
    taken.add(name.casefold())
    return Machine(name, parse_hosts(hosts))


def command_name() -> str:
    """How the user started this command, for its messages."""
    return "python -m fedgrpc.provision" if __name__ == "__main__" else "fedgrpc-provision"


def parse_plan(argv: list[str] | None) -> Plan:
    """The command line as a Plan; a bad one is refused in one line with exit status 2, before anything is written."""
    parser = Parser(
        prog=command_name(),
        description="Make a private CA, and for the leader and each learner a folder with its certificate, key, the CA "
        "certificate and the federation's enrolment secret; print the command each machine runs.",
    )
    parser.add_argument("out_dir", metavar="OUT_DIR", type=Path, help="folder to write into: new, or empty")
    parser.add_argument("--leader", required=True, metavar="HOST[,HOST...]", help="host names and IP addresses learners dial the leader at")
    learner_help = "a learner's folder name and the hosts the leader calls it back at; once per learner"
    parser.add_argument("--learner", dest="learners", action="append", required=True, metavar="NAME=HOST[,HOST...]", help=learner_help)
    port = bounded_int(1, MAX_PORT)
    parser.add_argument("--port", type=port, default=DEFAULT_PORT, help="port the leader listens on (default: %(default)s)")
    parser.add_argument("--learner-port", type=port, default=DEFAULT_LEARNER_PORT, help="port learners listen on (default: %(default)s)")
    parser.add_argument(
        "--days", type=bounded_int(1, MAX_DAYS), default=DEFAULT_DAYS, help="days certificates stay valid (default: %(default)s)"
    )
    args = parser.parse_args(argv)
    try:
        if not args.leader.strip(" ,"):
            raise ValueError("--leader needs the leader's host names or IP addresses")
        leader = Machine(LEADER, parse_hosts(args.leader))
        taken: set[str] = set()
        learners = tuple(parse_learner(text, taken) for text in args.learners)
    except ValueError as error:
        parser.error(str(error))
    if args.out_dir.exists() and (not args.out_dir.is_dir() or any(args.out_dir.iterdir())):
        parser.error(f"{args.out_dir} already holds files (or is not a folder): give a new or empty folder, so that no key is overwritten")
    return Plan(args.out_dir, leader, learners, args.port, args.learner_port, args.days)


def key_usage(**allowed: bool) -> x509.KeyUsage:
    """A KeyUsage extension allowing only the uses named."""
    uses = ("digital_signature", "content_commitment", "key_encipherment", "data_encipherment", "key_agreement", "key_cert_sign")
    return x509.KeyUsage(**{use: allowed.get(use, False) for use in (*uses, "crl_sign", "encipher_only", "decipher_only")})


def common_name(name: str) -> x509.Name:
    """An X.509 name holding only a common name."""
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])


def make_ca(now: datetime.datetime, days: int) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """The federation's CA: an EC P-256 key and its self-signed certificate, which may sign machines' certificates only."""
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(common_name(CA_COMMON_NAME))
        .issuer_name(common_name(CA_COMMON_NAME))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(key_usage(key_cert_sign=True, crl_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def subject_alternative_name(host: str) -> x509.GeneralName:
    """An IP address as IPAddress, anything else as DNSName."""
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def make_certificate(
    machine: Machine, ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, now: datetime.datetime, days: int
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A machine's key and its certificate for its hosts, signed by the CA, for serving and for calling: every machine is both."""
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(common_name(machine.name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([subject_alternative_name(host) for host in machine.hosts]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(key_usage(digital_signature=True), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert


def pem(item: ec.EllipticCurvePrivateKey | x509.Certificate) -> bytes:
    """A certificate as PEM, or a private key as unencrypted PKCS#8 PEM, as --tls-cert and --tls-key read them."""
    if isinstance(item, x509.Certificate):
        return item.public_bytes(serialization.Encoding.PEM)
    return item.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def make_folder(path: Path) -> None:
    """A new folder only its owner can enter."""
    path.mkdir(mode=PRIVATE_DIR_MODE)
    path.chmod(PRIVATE_DIR_MODE)  # exactly, whatever the umask


def write_new(path: Path, data: bytes, mode: int) -> None:
    """Write a file that must not exist yet, created with `mode` so that a key is never readable by others, not even for an instant."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(descriptor, "wb") as file:
        os.fchmod(file.fileno(), mode)  # exactly, whatever the umask
        file.write(data)
        file.flush()
        os.fsync(file.fileno())


def write_federation(plan: Plan) -> None:
    """The CA (its key in OUT_DIR/ca/), then one folder per machine: cert.pem, key.pem, ca.pem, enrolment.token."""
    now = datetime.datetime.now(datetime.UTC)
    token = secrets.token_urlsafe(32).encode() + b"\n"  # --token-file reads the file's text, stripped
    ca_key, ca_cert = make_ca(now, plan.days)
    plan.out_dir.mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)
    make_folder(plan.out_dir / CA_FOLDER)
    write_new(plan.out_dir / CA_FOLDER / "ca-key.pem", pem(ca_key), PRIVATE_FILE_MODE)
    write_new(plan.out_dir / "ca.pem", pem(ca_cert), PUBLIC_FILE_MODE)
    for machine in (plan.leader, *plan.learners):
        key, cert = make_certificate(machine, ca_key, ca_cert, now, plan.days)
        folder = plan.out_dir / machine.name
        make_folder(folder)
        write_new(folder / "key.pem", pem(key), PRIVATE_FILE_MODE)
        write_new(folder / "cert.pem", pem(cert), PUBLIC_FILE_MODE)
        write_new(folder / "ca.pem", pem(ca_cert), PUBLIC_FILE_MODE)
        write_new(folder / "enrolment.token", token, PRIVATE_FILE_MODE)


def address(host: str, port: int) -> str:
    """host:port, with an IPv6 address in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def tls_flags(name: str) -> str:
    """The TLS and enrolment flags of the machine whose folder is `name`, relative to the folder's parent."""
    return f"--tls-cert {name}/cert.pem --tls-key {name}/key.pem --tls-ca {name}/ca.pem --token-file {name}/enrolment.token"


def commands(plan: Plan) -> dict[str, str]:
    """The command each machine runs, by machine name, from the directory holding its folder."""
    leader = f"python leader.py --learners {len(plan.learners)} {tls_flags(LEADER)} --host 0.0.0.0 --port {plan.port}"
    runs = {LEADER: leader}
    for learner in plan.learners:
        runs[learner.name] = (
            f"python learner.py --leader {address(plan.leader.hosts[0], plan.port)} {tls_flags(learner.name)}"
            f" --port {plan.learner_port} --advertise-address {address(learner.hosts[0], plan.learner_port)}"
        )
    return runs


def report(plan: Plan) -> str:
    """What was made, what to copy where, and each machine's command."""
    runs = commands(plan)
    width = max(len(name) for name in runs) + 1
    lines = [
        f"Made a private CA and {len(runs)} machine folders in {plan.out_dir}, each with the machine's certificate and key "
        f"(valid {plan.days} days), the CA certificate and the federation's enrolment secret.",
        "Copy each folder to its machine and run its command there from the directory that holds the folder "
        "(the paths below are relative to that directory):",
        "",
        *(f"  {name + ':':<{width}}  {command}" for name, command in runs.items()),
        "",
        f"fedgrpc-leader and fedgrpc-learner take the same flags. Open port {plan.port} on the leader's machine to the learners, "
        f"and port {plan.learner_port} on each learner's machine to the leader.",
        f"The CA's key, {plan.out_dir / CA_FOLDER / 'ca-key.pem'}, is kept so that you can sign certificates for machines added "
        "later (each also needs a copy of enrolment.token); keep it safe and off the federation's machines: "
        "whoever holds it can make certificates the federation trusts.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Provision a mutual-TLS federation from the command line; print what to copy where and each machine's command."""
    plan = parse_plan(argv)
    try:
        write_federation(plan)
    except OSError as error:
        print(f"{command_name()}: error: cannot write {error.filename}: {error.strerror}", file=sys.stderr)
        return 1
    print(report(plan))
    return 0


if __name__ == "__main__":
    sys.exit(main())
