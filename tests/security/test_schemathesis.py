"""Schemathesis against a real node on HTTPS with authentication on: every operation of the node's own
/openapi.json, sent generated valid and invalid requests with an admin key and the admin client
certificate (so /admin/* is reached too), must never answer with a 5xx, nor stream a server error."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import httpx
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from hypothesis.strategies import SearchStrategy
from pydantic import BaseModel
from schemathesis.checks import not_a_server_error
from schemathesis.errors import FailureGroup

from edgegen.node.openai import ChatRequest, CompletionRequest
from tests.security.conftest import Fleet, SecureNode

# Changes which version of a model is served, in the store that the other modules of this package share;
# restarts the node under test (tests/e2e/test_operations.py restarts nodes, under load).
EXCLUDED = {("POST", "/admin/models/{name}/activate"), ("POST", "/admin/restart")}
EXAMPLES = 25  # per operation and way of generating: about 700 requests, 15 s on 2 cores
MODELS = ("digits", "tiny-llm")  # what the fleet's store holds; random names only ever reach a 404
LLM, CONTEXT, TOKENS = "tiny-llm", 2048, 8  # the context: EDGEGEN_LLM__CTX_PER_SEQ in tests.e2e.conftest
EXCERPT = 300

# The node parses these bodies by hand, so its schema declares none (or no shape) and schemathesis
# would only send empty ones. Until it does, the test describes them, from the node's own request models.
INFER_BODY = {
    "type": "object",
    "required": ["inputs"],
    "properties": {
        "id": {"type": "string"},
        "inputs": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["name", "shape", "datatype", "data"],
                "properties": {
                    "name": {"enum": ["input", "x"]},
                    "shape": {"type": "array", "items": {"type": "integer"}, "maxItems": 3},
                    "datatype": {"enum": ["FP32", "FP64", "INT64", "BOOL", "BYTES"]},
                    "data": {"type": "array", "items": {"type": "number"}, "maxItems": 80},
                    "parameters": {"type": "object"},
                },
            },
        },
        "outputs": {"type": "array", "items": {"type": "object"}},
        "parameters": {"type": "object"},
    },
}
OPENAI_BODIES: dict[str, type[BaseModel]] = {
    "/v1/completions": CompletionRequest,
    "/v1/chat/completions": ChatRequest,
}


@dataclass
class ServerError:
    label: str
    status: int
    case: schemathesis.Case
    response: schemathesis.Response
    curl: str

    def report(self) -> str:
        case = self.case
        sent = {"path": case.path_parameters, "query": case.query, "body": case.body}
        sent = {k: v for k, v in sent.items() if v not in (None, {})}
        return (
            f"{self.label} -> {self.status}\n    sent: {str(sent)[:EXCERPT]}\n"
            f"    answer: {self.response.text[:EXCERPT]!r}\n    {self.curl}"
        )


def _describe_bodies(raw: dict[str, Any]) -> dict[str, Any]:
    """Give the operations whose body the schema leaves undescribed one (see INFER_BODY)."""
    paths, components = raw["paths"], raw.setdefault("components", {}).setdefault("schemas", {})
    for path, model in OPENAI_BODIES.items():
        if "requestBody" in paths[path]["post"]:
            continue
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schema["properties"]["n"] = {"const": 1}  # what the node's validator allows; any other is a 400
        components.update(schema.pop("$defs", {}))
        paths[path]["post"]["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": schema}},
        }
    for path, methods in paths.items():
        if path.endswith("/infer"):
            methods["post"]["requestBody"]["content"]["application/json"].setdefault("schema", INFER_BODY)
    return raw


def _aim(case: schemathesis.Case) -> schemathesis.Case:
    """Ask the LLM the node serves, for a few tokens (2 cores make a few dozen a second); a length past
    the context is left as generated, since the node must refuse that."""
    if isinstance(case.body, dict):
        case.body["model"] = LLM
        for key in ("max_tokens", "max_completion_tokens"):
            asked = case.body.get(key)
            if not isinstance(asked, int) or asked <= CONTEXT:
                case.body[key] = min(asked, TOKENS) if isinstance(asked, int) else TOKENS
    return case


def _strategies(operation: schemathesis.APIOperation) -> list[tuple[str, SearchStrategy[schemathesis.Case]]]:
    positive, negative = schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE
    out: list[tuple[str, SearchStrategy[schemathesis.Case]]] = [("positive", operation.as_strategy(positive))]
    if operation.body or any(operation.iter_parameters()):  # with nothing to send there is nothing to break
        out.append(("negative", operation.as_strategy(negative)))
    names = {p.name for p in operation.path_parameters}
    if "name" in names:
        path = st.sampled_from(MODELS).map(
            lambda m: {"name": m} | ({"version": "1"} if "version" in names else {})
        )
        out += [
            (
                f"{mode.value}, served model",
                path.flatmap(lambda p, m=mode: operation.as_strategy(m, path_parameters=p)),
            )
            for mode in ((positive, negative) if operation.body else (positive,))
        ]
    elif operation.path in OPENAI_BODIES:
        out += [
            (f"{mode.value}, served model", operation.as_strategy(mode).map(_aim))
            for mode in (positive, negative)
        ]
    return out


@dataclass
class Target:
    """The node, and how every request reaches it: admin key, admin client certificate, the fleet's CA."""

    url: str
    session: requests.Session
    headers: dict[str, str]
    verify: str
    cert: tuple[str, str]

    def send(self, case: schemathesis.Case) -> schemathesis.Response:
        return case.call(
            base_url=self.url,
            session=self.session,
            headers=self.headers,
            verify=self.verify,
            cert=self.cert,
            timeout=60,
        )

    def curl(self, case: schemathesis.Case) -> str:
        """A command that sends the same request again, while the fleet's files exist: set ADMIN_KEY."""
        command = case.as_curl_command(headers={"Authorization": "Bearer $ADMIN_KEY"}, base_url=self.url)
        return f"{command} --cacert {self.verify} --cert {self.cert[0]} --key {self.cert[1]}"


def _exercise(
    target: Target,
    label: str,
    strategy: SearchStrategy[schemathesis.Case],
    seen: Counter[int],
    errors: list[ServerError],
) -> None:
    @settings(
        max_examples=EXAMPLES,
        phases=[Phase.generate],  # every failure is collected, none shrunk
        deadline=None,
        database=None,
        derandomize=True,  # the same requests on every run: a failure here is no fluke
        suppress_health_check=list(HealthCheck),
    )
    @given(case=strategy)
    def call(case: schemathesis.Case) -> None:
        response = target.send(case)
        seen[response.status_code] += 1
        try:
            case.validate_response(response, checks=[not_a_server_error], headers=target.headers)
        except FailureGroup:
            errors.append(ServerError(label, response.status_code, case, response, target.curl(case)))
            return
        streamed = "text/event-stream" in response.headers.get("content-type", [""])[0]
        if streamed and '"type":"server_error"' in response.text:  # a 200 whose stream then failed
            errors.append(ServerError(label, response.status_code, case, response, target.curl(case)))

    call()


def test_no_operation_answers_5xx(fleet: Fleet, node: SecureNode) -> None:
    headers = fleet.headers("admin")
    answer = httpx.get(
        f"{node.url}/openapi.json", headers=headers, verify=fleet.client_tls("ops"), timeout=10
    )
    answer.raise_for_status()
    schema = schemathesis.openapi.from_dict(_describe_bodies(answer.json()))
    schema.config.output.sanitization.update(enabled=False)  # or "max_tokens" reads [Filtered] in a report
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) > 10
    errors: list[ServerError] = []
    statuses: dict[str, Counter[int]] = {}
    started = time.monotonic()
    with requests.Session() as session:
        pki = fleet.pki
        target = Target(
            node.url, session, headers, str(pki / "ca.crt"), (str(pki / "ops.crt"), str(pki / "ops.key"))
        )
        for operation in operations:
            if (operation.method.upper(), operation.path) in EXCLUDED:
                continue
            seen = statuses.setdefault(operation.label, Counter())
            for how, strategy in _strategies(operation):
                try:
                    _exercise(target, f"{operation.label} ({how})", strategy, seen, errors)
                except Unsatisfiable:
                    # Nothing but a path parameter of any string (or a body of any shape) to break: there
                    # is no invalid request to make, and schemathesis's own runner skips these as well.
                    if not how.startswith("negative"):
                        raise
    took = time.monotonic() - started
    summary = "\n".join(f"  {label}: {dict(counts)}" for label, counts in statuses.items())
    print(f"{sum(c.total() for c in statuses.values())} requests in {took:.1f} s\n{summary}")
    # The credentials worked, or the run tested nothing but the gate.
    assert statuses["GET /admin/models"][200], summary
    assert statuses["GET /v2/models/{name}"][200], summary
    distinct = {(e.label, e.status): e for e in errors}
    assert not errors, f"{len(errors)} server errors, {len(distinct)} distinct:\n" + "\n".join(
        e.report() for e in distinct.values()
    )
