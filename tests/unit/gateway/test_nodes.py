"""The gateway's client for its own calls to nodes: what it shows a node, and how a node's refusal reaches
the operator who asked."""

from __future__ import annotations

import aiohttp
import pytest
from pydantic import SecretStr

from edgegen.errors import status_of
from edgegen.gateway.balancers import Backend
from edgegen.gateway.nodes import NodeClient, refusal
from edgegen.security.auth import Principal


def no_pool(_backend: Backend) -> aiohttp.ClientSession:
    raise AssertionError("no call is made here")


@pytest.mark.parametrize("status", [400, 401, 403, 404, 409, 413, 422])
def test_a_nodes_refusal_reaches_the_client_with_the_nodes_status(status: int) -> None:
    error = refusal(status, "node 'n1': no")
    assert (status_of(error), error.message) == (status, "node 'n1': no")


@pytest.mark.parametrize(("status", "relayed"), [(405, 400), (429, 400), (500, 502), (503, 502), (302, 502)])
def test_a_status_the_tree_cannot_tell_is_a_400_and_a_nodes_failure_a_502(status: int, relayed: int) -> None:
    assert status_of(refusal(status, "x")) == relayed


def test_over_mutual_tls_the_gateway_vouches_for_itself_and_never_sends_the_key() -> None:
    nodes = NodeClient(no_pool, vouch=True, key=SecretStr("eg_secret"))
    assert set(nodes.credentials) == {"x-edgegen-principal"}
    assert Principal("gateway", "operator").to_header().decode() == nodes.credentials["x-edgegen-principal"]


def test_without_mutual_tls_the_gateway_shows_the_operator_key_if_any() -> None:
    assert NodeClient(no_pool, vouch=False, key=SecretStr("eg_secret")).credentials == {
        "authorization": "Bearer eg_secret"
    }
    assert NodeClient(no_pool, vouch=False, key=None).credentials == {}
