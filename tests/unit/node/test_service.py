"""The inference service (engine/service.py) on a real node's registry and cache: who may use a model, what
the cache answers, and what is refused before any work — the one door every route and job passes."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
from starlette.testclient import TestClient

from edgegen.cache import Directives
from edgegen.engine.sampling import SamplingParams
from edgegen.engine.service import ANY_USE, Caller, InferenceService, TextRequest
from edgegen.errors import Forbidden, InvalidInput, ModelNotFound
from edgegen.security.auth import Principal
from edgegen.store import ModelStore


def caller(
    models: tuple[str, ...] | None = None, tenant: str = "acme", cache: Directives = ANY_USE
) -> Caller:
    return Caller(Principal(f"key:{tenant}", "user", models, tenant), cache)


def service_of(client: TestClient) -> InferenceService:
    service: InferenceService = client.app.state.node.service
    return service


def pixels() -> np.ndarray:
    """One digit-shaped sample: 64 grey levels."""
    return np.arange(64, dtype=np.float32).reshape(1, 64) % 17


def test_a_caller_learns_nothing_of_models_outside_its_scope(client: TestClient) -> None:
    service = service_of(client)
    assert service.model(caller(), "digits").manifest.name == "digits"
    with pytest.raises(Forbidden):
        service.model(caller(("digits",)), "no-such-model")  # 403, not 404: its scope decides first
    with pytest.raises(ModelNotFound):
        service.model(caller(), "no-such-model")
    with pytest.raises(InvalidInput, match="does not generate text"):
        service.generator(caller(), "digits")


def test_predictions_are_cached_per_tenant_and_as_cache_control_allows(client: TestClient) -> None:
    service = service_of(client)
    served = service.fixed_shape(caller(), "digits")
    name = served.manifest.inputs[0].name

    def predict(who: Caller) -> tuple[np.ndarray, dict[str, str]]:
        outputs, headers = client.portal.call(service.predict, who, served, {name: pixels()})
        return outputs[served.manifest.outputs[0].name], headers

    first, headers = predict(caller())
    assert headers["X-Edgegen-Cache"] == "miss"
    again, headers = predict(caller())
    assert headers["X-Edgegen-Cache"] == "hit"
    np.testing.assert_array_equal(again, first)  # the same answer, from the cache
    assert predict(caller(tenant="globex"))[1]["X-Edgegen-Cache"] == "miss"  # another tenant's are its own
    fresh = Directives(read=False, write=True, max_age=None)  # Cache-Control: no-cache
    assert predict(caller(cache=fresh))[1]["X-Edgegen-Cache"] == "bypass"


def test_a_generation_is_refused_on_a_model_that_does_not_generate(client: TestClient) -> None:
    service = service_of(client)
    served = service.model(caller(), "digits")
    request = TextRequest(SamplingParams(temperature=0), max_tokens=4, text="hi")
    with pytest.raises(InvalidInput, match="does not generate text"):
        client.portal.call(service.generate, caller(), served, request)


def test_a_prediction_given_a_version_replaced_before_it_was_queued_is_answered_by_the_new_one(
    client: TestClient, store: ModelStore, model_files: dict[str, Path]
) -> None:
    """A route takes the model, then reads the body; a version swap lands meanwhile (a slow client, a
    rollout): the old version is closed, and the prediction goes to the one that replaced it. Before,
    it waited in the closed version's queue for its whole deadline and got a 504 (the gateway counts
    those against the node)."""
    service = service_of(client)
    old = service.fixed_shape(caller(), "digits")
    store.add(model_files["onnx"], "digits", "2", activate=False)
    client.portal.call(client.app.state.node.registry.activate, "digits", "2")
    client.portal.call(asyncio.sleep, 0.1)  # the old version's drain ran: it is closed
    name = old.manifest.inputs[0].name

    async def predict() -> tuple[dict[str, np.ndarray], dict[str, str]]:
        return await asyncio.wait_for(service.predict(caller(), old, {name: pixels()}), 5)

    outputs, _ = client.portal.call(predict)
    assert outputs[old.manifest.outputs[0].name].shape == (1, 10)
    assert service.model(caller(), "digits").manifest.version == "2"
