"""TLS and mutual TLS with a private CA made in the test: a round completes, clients without a certificate are refused."""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from conftest import join_all, leader_config, start_learners
from fedgrpc.leader import main as leader_module
from fedgrpc.protos import leader_pb2, leader_pb2_grpc
from fedgrpc.transport import rpc
from fedgrpc.transport.tls import CertificateBinding, Tls, speaks_tls, tls_mismatch


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> str:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return str(path)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, str]:
    """A CA and three certificates it signed, for 127.0.0.1 and localhost: the leader's, a learner's and another's."""
    directory = tmp_path_factory.mktemp("pki")
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(_name("test CA"))
        .issuer_name(_name("test CA"))
        .public_key(ca_key.public_key())
        .serial_number(1)
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    files = {"ca": str(directory / "ca.pem")}
    (directory / "ca.pem").write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    for serial, role in enumerate(("leader", "learner", "other"), start=2):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(role))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(serial)
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(
                x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False
            )
            .sign(ca_key, hashes.SHA256())
        )
        (directory / f"{role}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        files[f"{role}_cert"] = str(directory / f"{role}.pem")
        files[f"{role}_key"] = _write_key(directory / f"{role}.key", key)
    return files


def tls_leader_config(tmp_path, pki, **overrides):
    return leader_config(tmp_path, tls_cert=pki["leader_cert"], tls_key=pki["leader_key"], tls_ca=pki["ca"], **overrides)


def test_a_round_completes_over_mutual_tls(tmp_path, pki):
    leader, server, port, _ = leader_module.serve(tls_leader_config(tmp_path, pki, rounds=2, aggregation="fedavg", local_steps=2))
    try:
        learners = start_learners(
            f"127.0.0.1:{port}", 2, ["--tls-cert", pki["learner_cert"], "--tls-key", pki["learner_key"], "--tls-ca", pki["ca"]]
        )
        history = leader.run()
        assert [entry["learners_reported"] for entry in history] == [2, 2]
        assert join_all(learners) == [0, 0]
    finally:
        server.stop(None)
        leader.close()


def test_clients_without_a_certificate_are_refused_under_mutual_tls(tmp_path, pki):
    leader, server, port, _ = leader_module.serve(tls_leader_config(tmp_path, pki))
    address = f"127.0.0.1:{port}"
    tls = Tls.from_files(pki["learner_cert"], pki["learner_key"], pki["ca"])
    # the learner's side of the registration check: a TLS server that answers health for the learner service
    callback, callback_port, _ = rpc.create_server(
        lambda server: None, "127.0.0.1", 0, max_workers=4, tls=tls, health_services=[rpc.LEARNER_SERVICE]
    )
    info = leader_pb2.LearnerInfo(
        network_addr=f"127.0.0.1:{callback_port}", callback_token="c" * 32, version=rpc.PROTOCOL_VERSION, tls=True
    )
    ca = Path(pki["ca"]).read_bytes()
    channels = {
        "no client certificate": grpc.secure_channel(address, grpc.ssl_channel_credentials(root_certificates=ca)),
        "plaintext": grpc.insecure_channel(address),
    }
    try:
        for what, channel in channels.items():
            with pytest.raises(grpc.RpcError) as caught:
                leader_pb2_grpc.LeaderServiceStub(channel).RegisterLearner(info, timeout=5)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE, what
        assert not leader.roster.records()
        # with the learner certificate the same call goes through, so the refusals above were about the certificate
        reply = leader_pb2_grpc.LeaderServiceStub(rpc.channel(address, tls)).RegisterLearner(info, timeout=5)
        assert reply.success
        without_tls_server = leader_pb2.LearnerInfo(network_addr="127.0.0.1:2", callback_token="d" * 32, version=rpc.PROTOCOL_VERSION)
        with pytest.raises(grpc.RpcError) as caught:
            leader_pb2_grpc.LeaderServiceStub(rpc.channel(address, tls)).RegisterLearner(without_tls_server, timeout=5)
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "--tls-cert" in caught.value.details()
    finally:
        for channel in channels.values():
            channel.close()
        server.stop(None)
        callback.stop(None)
        leader.close()


def test_tls_flags_are_checked(tmp_path, pki):
    with pytest.raises(ValueError, match="go together"):
        Tls.from_files(pki["leader_cert"], None, None)
    with pytest.raises(ValueError, match="cannot read --tls-ca"):
        Tls.from_files(None, None, str(tmp_path / "missing.pem"))
    with pytest.raises(ValueError, match="needs --tls-cert and --tls-key"):
        leader_module.serve(leader_config(tmp_path, tls_ca=pki["ca"]))


def test_a_learner_without_tls_against_a_tls_leader_is_told_so_at_once(tmp_path, pki, capsys):
    leader, server, port, _ = leader_module.serve(tls_leader_config(tmp_path, pki))
    try:
        assert speaks_tls(f"127.0.0.1:{port}") is True  # it wants a client certificate: its alert still speaks TLS
        (learner,) = start_learners(f"127.0.0.1:{port}", 1)  # no TLS flags; --connect-timeout 30 would be the wait
        assert join_all([learner]) == [1]
        assert "speaks TLS and this side does not: add --tls-ca" in capsys.readouterr().err
    finally:
        server.stop(None)
        leader.close()


def test_a_tls_learner_against_a_plaintext_leader_is_told_so_at_once(tmp_path, pki, capsys):
    leader, server, port, _ = leader_module.serve(leader_config(tmp_path))
    try:
        assert speaks_tls(f"127.0.0.1:{port}") is False
        flags = ["--tls-cert", pki["learner_cert"], "--tls-key", pki["learner_key"], "--tls-ca", pki["ca"]]
        (learner,) = start_learners(f"127.0.0.1:{port}", 1, flags)
        assert join_all([learner]) == [1]
        assert "does not speak TLS and this side does: drop the --tls-* flags here" in capsys.readouterr().err
    finally:
        server.stop(None)
        leader.close()


def test_nothing_listening_is_not_a_tls_mismatch():
    from fedgrpc.engines.launcher import free_port

    address = f"127.0.0.1:{free_port()}"
    assert speaks_tls(address) is None and tls_mismatch(address, True, "leader") is None


def test_a_session_is_bound_to_the_certificate_it_was_issued_to(tmp_path, pki):
    leader, server, port, _ = leader_module.serve(tls_leader_config(tmp_path, pki))
    address = f"127.0.0.1:{port}"
    mine = Tls.from_files(pki["learner_cert"], pki["learner_key"], pki["ca"])
    theirs = Tls.from_files(pki["other_cert"], pki["other_key"], pki["ca"])
    callback, callback_port, _ = rpc.create_server(
        lambda server: None, "127.0.0.1", 0, max_workers=4, tls=mine, health_services=[rpc.LEARNER_SERVICE]
    )
    info = leader_pb2.LearnerInfo(
        network_addr=f"127.0.0.1:{callback_port}", callback_token="c" * 32, version=rpc.PROTOCOL_VERSION, tls=True
    )
    try:
        reply = leader_pb2_grpc.LeaderServiceStub(rpc.channel(address, mine)).RegisterLearner(info, timeout=5)
        heartbeat = leader_pb2.HeartbeatRequest(learner_id=reply.learner_id)
        metadata = rpc.token_metadata(reply.session_token)
        assert leader_pb2_grpc.LeaderServiceStub(rpc.channel(address, mine)).Heartbeat(heartbeat, timeout=5, metadata=metadata).success
        stolen = leader_pb2_grpc.LeaderServiceStub(rpc.channel(address, theirs))
        with pytest.raises(grpc.RpcError) as caught:  # the session token, presented with another (valid) certificate
            stolen.Heartbeat(heartbeat, timeout=5, metadata=metadata)
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED and "issued to another client certificate" in caught.value.details()
        with pytest.raises(grpc.RpcError) as caught:  # the learner's own secret, presented with another certificate
            stolen.RegisterLearner(info, timeout=5)
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED and "another client certificate" in caught.value.details()
    finally:
        server.stop(None)
        callback.stop(None)
        leader.close()


class FakeContext:
    """What CertificateBinding reads of a call: the certificate presented, and how the call is aborted."""

    def __init__(self, pem: bytes | None) -> None:
        self.pem = pem

    def auth_context(self) -> dict:
        return {"x509_pem_cert": [self.pem]} if self.pem else {}

    def abort(self, code, details):
        raise grpc.RpcError(f"{code.name}: {details}")


def test_a_learner_binds_its_leaders_certificate_at_the_first_call(pki):
    binding = CertificateBinding()
    leader_pem, other_pem = Path(pki["leader_cert"]).read_bytes(), Path(pki["other_cert"]).read_bytes()
    binding.check(FakeContext(leader_pem))
    binding.check(FakeContext(leader_pem))
    for stranger in (other_pem, None):
        with pytest.raises(grpc.RpcError, match="UNAUTHENTICATED: another client certificate"):
            binding.check(FakeContext(stranger))


def test_a_pool_of_virtual_learners_takes_part_over_mutual_tls(tmp_path, pki):
    from fedgrpc.engines.pool import PoolConfig, run_pool

    leader, server, port, _ = leader_module.serve(tls_leader_config(tmp_path, pki, rounds=1, aggregation="fedavg", local_steps=1))
    files = {"tls_cert": pki["learner_cert"], "tls_key": pki["learner_key"], "tls_ca": pki["ca"]}
    try:
        pool = run_pool(PoolConfig(leader=f"127.0.0.1:{port}", connect_timeout=30, **files), [0, 1])
        history = leader.run()
        assert [entry["learners_reported"] for entry in history] == [2]
        assert pool.done.wait(60)
        assert all(record.certificate is not None for record in leader.roster.records())  # both registered with a certificate
    finally:
        server.stop(None)
        leader.close()
