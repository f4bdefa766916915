"""fedgrpc-provision: the files it makes and their modes, certificates that chain to its CA, a federation run from its
printed commands over mutual TLS, and the command lines it refuses without writing anything."""

from __future__ import annotations

import ipaddress
import shlex
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from conftest import join_all, leader_config, start_learners
from fedgrpc import provision
from fedgrpc.config.files import read_enrolment_token
from fedgrpc.leader import main as leader_module

LEARNERS = ("site-a", "site-b")
MACHINES = ("leader", *LEARNERS)
# the printed flags that place a learner on the network; the test puts learners on free loopback ports instead
PLACEMENT_FLAGS = ("--leader", "--port", "--advertise-address")


def provisioned(out: Path, capsys) -> dict[str, list[str]]:
    """Provision a leader at 127.0.0.1 and localhost and two learners at 127.0.0.1; each machine's printed flags, by name."""
    argv = [str(out), "--leader", "127.0.0.1,localhost", *(arg for name in LEARNERS for arg in ("--learner", f"{name}=127.0.0.1"))]
    assert provision.main(argv) == 0
    printed = capsys.readouterr().out
    commands = {}
    for line in printed.splitlines():
        name, _, command = line.strip().partition(":  ")
        if name in MACHINES:
            words = shlex.split(command)
            assert words[:2] == ["python", "leader.py" if name == "leader" else "learner.py"]
            commands[name] = words[2:]
    assert sorted(commands) == sorted(MACHINES), printed
    assert str(out / "ca" / "ca-key.pem") in printed and "machines added later" in printed
    return commands


def flag_values(flags: list[str]) -> dict[str, str]:
    """--flag value pairs as a dict."""
    return dict(zip(flags[::2], flags[1::2], strict=True))


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_provision_makes_a_ca_and_a_folder_per_machine(tmp_path, capsys):
    out = tmp_path / "federation"
    commands = provisioned(out, capsys)
    ca = x509.load_pem_x509_certificate((out / "ca.pem").read_bytes())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    ca_key = serialization.load_pem_private_key((out / "ca" / "ca-key.pem").read_bytes(), password=None)
    assert ca_key.public_key() == ca.public_key()
    assert mode(out / "ca") == 0o700 and mode(out / "ca" / "ca-key.pem") == 0o600
    tokens = set()
    for name in MACHINES:
        folder = out / name
        assert sorted(path.name for path in folder.iterdir()) == ["ca.pem", "cert.pem", "enrolment.token", "key.pem"]
        assert mode(folder) == 0o700 and mode(folder / "key.pem") == 0o600 and mode(folder / "enrolment.token") == 0o600
        assert (folder / "ca.pem").read_bytes() == (out / "ca.pem").read_bytes()
        cert = x509.load_pem_x509_certificate((folder / "cert.pem").read_bytes())
        key = serialization.load_pem_private_key((folder / "key.pem").read_bytes(), password=None)
        assert key.public_key() == cert.public_key()
        cert.verify_directly_issued_by(ca)  # the issuer is the CA's subject, and the CA's key made the signature
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        expected_dns = ["localhost"] if name == "leader" else []
        assert names.get_values_for_type(x509.DNSName) == expected_dns
        assert names.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
        usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert set(usages) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
        assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        tokens.add(read_enrolment_token(str(folder / "enrolment.token")))
        flags = flag_values(commands[name])
        assert {flag: flags[flag] for flag in ("--tls-cert", "--tls-key", "--tls-ca", "--token-file")} == {
            "--tls-cert": f"{name}/cert.pem",
            "--tls-key": f"{name}/key.pem",
            "--tls-ca": f"{name}/ca.pem",
            "--token-file": f"{name}/enrolment.token",
        }
    assert len(tokens) == 1 and len(tokens.pop()) >= 43  # one secret for the federation: 32 random bytes, base64
    assert flag_values(commands["leader"])["--port"] == "10134"
    assert all(flag_values(commands[name])["--leader"] == "127.0.0.1:10134" for name in LEARNERS)


def test_a_round_completes_with_the_printed_files_over_mutual_tls(tmp_path, capsys, monkeypatch):
    out = tmp_path / "federation"
    commands = provisioned(out, capsys)
    monkeypatch.chdir(out)  # the printed paths are relative to the directory holding the machines' folders
    leader_flags = flag_values(commands["leader"])
    config = leader_config(
        tmp_path,
        rounds=1,
        learners=int(leader_flags["--learners"]),
        aggregation="fedavg",
        local_steps=2,
        tls_cert=leader_flags["--tls-cert"],
        tls_key=leader_flags["--tls-key"],
        tls_ca=leader_flags["--tls-ca"],
    )
    leader, server, port, _ = leader_module.serve(config, read_enrolment_token(leader_flags["--token-file"]))
    try:
        assert leader.roster.trusts_registrants
        learners = []
        for name in LEARNERS:
            flags = [word for flag, value in flag_values(commands[name]).items() if flag not in PLACEMENT_FLAGS for word in (flag, value)]
            learners += start_learners(f"127.0.0.1:{port}", 1, flags)
        history = leader.run()
        assert [entry["learners_reported"] for entry in history] == [2]
        assert join_all(learners) == [0, 0]
    finally:
        server.stop(None)
        leader.close()


@pytest.mark.parametrize(
    ("learners", "leader", "refusal"),
    [
        (["site a=127.0.0.1"], "127.0.0.1", "letters, digits"),
        (["../x=127.0.0.1"], "127.0.0.1", "letters, digits"),
        (["leader=127.0.0.1"], "127.0.0.1", "taken"),
        (["ca=127.0.0.1"], "127.0.0.1", "taken"),
        (["site-a=127.0.0.1", "Site-A=127.0.0.2"], "127.0.0.1", "given twice"),
        (["site-a"], "127.0.0.1", "needs its host names"),
        (["site-a="], "127.0.0.1", "needs its host names"),
        (["site-a=bad_host!"], "127.0.0.1", "neither a host name nor an IP address"),
        (["site-a=127.0.0.1"], "", "--leader needs"),
        (["site-a=127.0.0.1"], ",", "--leader needs"),
    ],
)
def test_bad_command_lines_are_refused_in_one_line_writing_nothing(tmp_path, capsys, learners, leader, refusal):
    out = tmp_path / "federation"
    out.mkdir()
    with pytest.raises(SystemExit) as exited:
        provision.main([str(out), "--leader", leader, *(arg for learner in learners for arg in ("--learner", learner))])
    assert exited.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.splitlines()) == 1 and refusal in captured.err
    assert captured.err.startswith("fedgrpc-provision: error: ")
    assert list(out.iterdir()) == []


def test_a_folder_that_holds_files_is_refused_and_left_as_it_was(tmp_path, capsys):
    out = tmp_path / "federation"
    out.mkdir()
    (out / "key.pem").write_text("an older key")
    missing = tmp_path / "new"
    for argv in ([str(out), "--leader", "127.0.0.1", "--learner", "site-a=127.0.0.1"], [str(missing), "--leader", "127.0.0.1"]):
        with pytest.raises(SystemExit) as exited:
            provision.main(argv)
        assert exited.value.code == 2
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1 and err.startswith("fedgrpc-provision: error: ")
    assert [path.name for path in out.iterdir()] == ["key.pem"] and (out / "key.pem").read_text() == "an older key"
    assert not missing.exists()  # refused for want of a --learner: not even the folder is made
