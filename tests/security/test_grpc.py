"""KServe v2 over gRPC on production-like nodes: TLS from the fleet's CA, API keys and JWTs in the call's
metadata, and on a node that requires client certificates, certificates of the CA only, checked against
its revocation list. The gRPC port goes through the same gate as HTTPS: what HTTPS refuses, gRPC refuses,
with the matching code."""

from __future__ import annotations

import ssl
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from edgegen.security.transport import pem_subject_name, subject_name
from tests.e2e.node_process import free_port, running
from tests.security.conftest import Fleet, SecureNode, make_jwt

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def grpc_node(fleet: Fleet) -> Iterator[SecureNode]:
    node = SecureNode(fleet, EDGEGEN_GRPC_PORT=str(free_port()))
    with running(node) as process:
        yield process


@pytest.fixture(scope="module")
def strict_node(fleet: Fleet) -> Iterator[SecureNode]:
    """Client certificates required, on both ports (its readiness probe shows one too)."""
    node = SecureNode(fleet, EDGEGEN_GRPC_PORT=str(free_port()), EDGEGEN_TLS__CLIENT_CERTS="required")
    node.verify = fleet.client_tls("alice")
    with running(node) as process:
        yield process


def port_of(node: SecureNode) -> str:
    return f"127.0.0.1:{node.env['EDGEGEN_GRPC_PORT']}"


def client(
    fleet: Fleet, node: SecureNode, cert: str | None = None, ca: str = "pki"
) -> triton.InferenceServerClient:
    """A client over TLS, checking the node against the fleet's CA; showing `cert` (of the CA in
    directory `ca`) when named."""
    pki = fleet.home / ca
    files = (
        {"private_key": str(pki / f"{cert}.key"), "certificate_chain": str(pki / f"{cert}.crt")}
        if cert
        else {}
    )
    return triton.InferenceServerClient(
        port_of(node), ssl=True, root_certificates=str(fleet.pki / "ca.crt"), **files
    )


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def infer(made: triton.InferenceServerClient, headers: dict[str, str], model: str = "digits") -> np.ndarray:
    tensor = triton.InferInput("input", [1, 64], "FP32")
    tensor.set_data_from_numpy(np.ones((1, 64), np.float32))
    answer = made.infer(model, [tensor], headers=headers).as_numpy("logits")
    assert answer is not None
    return answer


def status(call: object) -> str:
    with pytest.raises(InferenceServerException) as caught:
        call()  # type: ignore[operator]
    return str(caught.value.status())


def test_keys_and_tokens_over_tls(fleet: Fleet, grpc_node: SecureNode) -> None:
    with client(fleet, grpc_node) as made:
        assert infer(made, bearer(fleet.keys["user"])).shape == (1, 10)
        assert infer(made, bearer(make_jwt())).shape == (1, 10)
        assert status(lambda: infer(made, bearer(fleet.keys["revoked"]))) == "StatusCode.UNAUTHENTICATED"
        assert status(lambda: infer(made, bearer(make_jwt(lifetime=-60)))) == "StatusCode.UNAUTHENTICATED"
        assert status(lambda: infer(made, {})) == "StatusCode.UNAUTHENTICATED"
        only = bearer(fleet.keys["digits-only"])
        assert (
            status(lambda: made.get_model_metadata("tiny-llm", headers=only))
            == "StatusCode.PERMISSION_DENIED"
        )
        listed = made.get_inference_statistics(headers=only, as_json=True)["model_stats"]
        assert [s["name"] for s in listed] == ["digits"]


def test_required_client_certificates_are_the_ca_s_and_not_revoked(
    fleet: Fleet, strict_node: SecureNode
) -> None:
    user = bearer(fleet.keys["user"])
    with client(fleet, strict_node, cert="alice") as made:
        assert infer(made, user).shape == (1, 10)
        assert status(lambda: infer(made, {})) == "StatusCode.UNAUTHENTICATED"  # a certificate is no key
    with client(fleet, strict_node, cert="revoked") as made:  # on the CA's revocation list
        with pytest.raises(InferenceServerException, match="revoked") as caught:
            infer(made, user)
        assert caught.value.status() == "StatusCode.UNAUTHENTICATED"
    with client(fleet, strict_node, cert="ops", ca="other-ca") as made:  # another CA's: no handshake
        assert status(lambda: infer(made, user)) == "StatusCode.UNAVAILABLE"
    with client(fleet, strict_node) as made:  # none at all
        assert status(lambda: infer(made, user)) == "StatusCode.UNAVAILABLE"


def test_plaintext_reaches_nothing(fleet: Fleet, grpc_node: SecureNode) -> None:
    with grpc.insecure_channel(port_of(grpc_node)) as channel:
        live = channel.unary_unary("/inference.GRPCInferenceService/ServerLive")
        with pytest.raises(grpc.RpcError) as caught:
            live(b"", timeout=5)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


def test_the_subject_grpc_shows_reads_as_the_https_one(fleet: Fleet) -> None:
    """The gate reads a caller's role from the certificate's subject: both servers must write it alike
    (HTTPS from Python's ssl module, gRPC from the PEM)."""
    for name in ("ops", "alice", "gw", "node1"):
        path = fleet.pki / f"{name}.crt"
        decoded = ssl._ssl._test_decode_cert(str(path))  # type: ignore[attr-defined]  # what getpeercert gives
        assert pem_subject_name(path.read_bytes()) == subject_name(decoded)
