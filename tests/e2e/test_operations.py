"""Remote operations through the gateway on real nodes: a restart under load drops nothing — the node
is drained first (its streams finish), restarted in place, and put back once a new process is ready —;
a model version rolls out node by node, a bad one stops at the health gate and is rolled back, and an
explicit rollback puts the earlier versions back."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import orjson
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgegen.executors import describe_model
from edgegen.modelkit.onnx_writer import mlp_to_onnx
from edgegen.store import ModelStore
from edgegen.store.manifest import TensorSpec
from tests.conftest import fill_store, make_layers
from tests.e2e.conftest import LLM_ENV
from tests.e2e.node_process import GatewayProcess, NodeProcess, free_port, gateway_config, running
from tests.llm_models import write_tiny_llama


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, model_files: dict[str, Path]) -> Iterator[GatewayProcess]:
    root = tmp_path_factory.mktemp("ops")
    nodes = []
    for i in range(2):
        store = fill_store(root / f"node{i}" / "models", model_files)
        store.add(write_tiny_llama(root / f"node{i}" / "tiny.gguf"), "tiny-llm", task="text-generation")
        nodes.append(NodeProcess(root / f"node{i}", env=LLM_ENV))
    routes = '[balancer]\nroutes = { "/v1/chat/completions" = "round_robin" }\n'
    config = gateway_config(root / "gateway.toml", nodes, routes + "[operations]\nobserve_s = 0.5\n")
    # The rollout test's broken versions, on purpose: one fails every inference, one cannot load.
    broken = ('"msg":"inference failed","request_id"', '"msg":"model not loaded"')
    with (
        running(nodes[0], broken),
        running(nodes[1], broken),
        running(GatewayProcess(root, "--config", str(config))) as gateway,
    ):
        yield gateway


def stream(gateway: GatewayProcess, out: list[tuple[str, list[str]]], started: threading.Barrier) -> None:
    # Greedy: the tiny model never ends early, so the stream is still running when its node is drained; long
    # enough (1,500 tokens of a 2,048 context) that a loaded machine's slow restart call still finds it there.
    body = {"model": "tiny-llm", "messages": [{"role": "user", "content": "go on"}], "max_tokens": 1500,
            "temperature": 0, "stream": True}  # fmt: skip
    with httpx.stream("POST", f"{gateway.url}/v1/chat/completions", json=body, timeout=120) as response:
        started.wait(timeout=60)  # its node is chosen: the restart may begin
        events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
        out.append((response.headers["x-edgegen-node"], events))


def test_a_restart_under_load_drops_nothing(fleet: GatewayProcess) -> None:
    statuses: Counter[int] = Counter()
    served: Counter[str] = Counter()
    stop = threading.Event()

    def load() -> None:
        with httpx.Client(base_url=fleet.url, timeout=30) as client:
            while not stop.is_set():
                answer = client.post("/predict", json={"input_data": [3.0] * 64})
                statuses[answer.status_code] += 1
                served[answer.headers.get("x-edgegen-node", "-")] += 1

    streams: list[tuple[str, list[str]]] = []
    workers = [threading.Thread(target=load) for _ in range(2)]
    started = threading.Barrier(3)  # both streams under way (round robin: one on each node), and this test
    workers += [threading.Thread(target=stream, args=(fleet, streams, started)) for _ in range(2)]
    for worker in workers:
        worker.start()
    try:
        started.wait(timeout=60)
        restarted = httpx.post(f"{fleet.url}/gateway/nodes/n0/restart", timeout=180)
    finally:
        stop.set()
        for worker in workers:
            worker.join(timeout=120)
    assert restarted.status_code == 200, restarted.text
    result = restarted.json()
    assert result["started"] > result["started_before"]  # a new process (exec: the same pid, a new start)
    assert result["drained_s"] > 0  # it waited for what n0 had, its stream among them
    assert set(statuses) == {200}, statuses  # nothing dropped, nothing failed
    assert sum(statuses.values()) > 100
    assert sorted(node for node, _ in streams) == ["n0", "n1"]
    for _, events in streams:  # both streams, n0's across its drain, ended whole
        assert events[-1] == "[DONE]"
        assert orjson.loads(events[-2])["choices"][0]["finish_reason"] in ("stop", "length")
        assert not any("error" in orjson.loads(e) for e in events[:-1])
    after = Counter(
        httpx.post(f"{fleet.url}/predict", json={"input_data": [3.0] * 64}).headers["x-edgegen-node"]
        for _ in range(10)
    )
    assert after["n0"] > 0  # back in the fleet


def test_the_command_restarts_a_node(fleet: GatewayProcess) -> None:
    command = [sys.executable, "-m", "edgegen", "admin", "restart", "n1", "--gateway", fleet.url]
    done = subprocess.run(command, capture_output=True, text=True, timeout=200)
    assert done.returncode == 0, done.stderr
    assert "n1: drained in" in done.stderr
    missing = subprocess.run(
        [*command[:5], "no-such-node", *command[6:]], capture_output=True, text=True, timeout=60
    )
    assert missing.returncode == 1
    assert "answered 404" in missing.stderr


def test_a_fleet_restart_goes_node_by_node_and_says_where_it_stopped(fleet: GatewayProcess) -> None:
    """`edgegen admin restart` (every node): both nodes restarted in turn; a node that cannot be reached
    stops the round there, and the answer names it beside those restarted."""
    command = [sys.executable, "-m", "edgegen", "admin", "restart", "--gateway", fleet.url]
    done = subprocess.run(command, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr
    assert "n0: drained in" in done.stderr
    assert "n1: drained in" in done.stderr
    dead = httpx.post(
        f"{fleet.url}/gateway/nodes", json={"name": "gone", "url": f"http://127.0.0.1:{free_port()}"}
    )
    assert dead.status_code == 201
    try:
        answer = httpx.post(f"{fleet.url}/gateway/restart", timeout=400).json()
    finally:
        httpx.delete(f"{fleet.url}/gateway/nodes/gone").raise_for_status()
    assert answer["ok"] is False
    assert [r["node"] for r in answer["restarted"]] == ["n0", "n1"]
    assert answer["failed"]["node"] == "gone"
    assert "cannot be reached" in answer["failed"]["reason"]


def broken_onnx(path: Path) -> Path:
    """A model that loads, then fails every inference: its Reshape asks for a shape no input has."""
    shape = numpy_helper.from_array(np.array([7, 3], dtype=np.int64), "shape")
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["input", "shape"], ["logits"])],
        "broken",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        initializer=[shape],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.write_bytes(model.SerializeToString())
    return path


def unloadable_onnx(path: Path) -> Path:
    """A model no runtime can load (an operator of a domain nobody registered), as a package made on
    another machine would bring it: the store here is told its inputs and outputs (`digits_specs`)."""
    graph = helper.make_graph(
        [helper.make_node("NoSuchOp", ["input"], ["logits"], domain="edgegen.tests")],
        "unloadable",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("edgegen.tests", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 8
    path.write_bytes(model.SerializeToString())
    return path


def digits_specs(_model: Path, _format: str) -> tuple[list[TensorSpec], list[TensorSpec]]:
    inputs = [TensorSpec(name="input", dtype="float32", shape=(-1, 64))]
    return inputs, [TensorSpec(name="logits", dtype="float32", shape=(-1, 10))]


def served(gateway: GatewayProcess) -> dict[str, str]:
    view = httpx.get(f"{gateway.url}/gateway/fleet").json()
    return {node["name"]: node["models"]["digits"] for node in view["nodes"]}


def test_a_rollout_a_bad_rollout_and_a_rollback(fleet: GatewayProcess, tmp_path: Path) -> None:
    good = tmp_path / "good.onnx"
    good.write_bytes(mlp_to_onnx(make_layers(seed=5)))
    for i in range(2):  # each node's store gets version 2 (good) and 3 (loads, then fails every inference)
        store = ModelStore(fleet.home / f"node{i}" / "models", describe=describe_model)
        assert store.add(good, "digits", activate=False).version == "2"
        assert store.add(broken_onnx(tmp_path / "bad.onnx"), "digits", activate=False).version == "3"
    done = httpx.post(
        f"{fleet.url}/gateway/rollout", json={"model": "digits", "version": "2"}, timeout=120
    ).json()
    assert done["ok"] is True
    assert [(n["node"], n["previous"], n["version"]) for n in done["nodes"]] == [
        ("n0", "1", "2"),
        ("n1", "1", "2"),
    ]
    time.sleep(1.2)  # the fleet view reads statuses every 0.5 s
    assert served(fleet) == {"n0": "2", "n1": "2"}
    command = [
        sys.executable,
        "-m",
        "edgegen",
        "admin",
        "rollout",
        "digits",
        "--version",
        "3",
        "--gateway",
        fleet.url,
    ]
    bad = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1
    assert "stopped at n0" in bad.stderr
    assert "probe inference answered 500" in bad.stderr
    assert "n0: back to 2" in bad.stderr
    time.sleep(1.2)
    assert served(fleet) == {"n0": "2", "n1": "2"}  # n1 never saw version 3; n0 went back
    assert httpx.post(f"{fleet.url}/predict", json={"input_data": [1.0] * 64}).status_code == 200
    for i in range(2):  # version 4 fails readiness: the node cannot load it
        store = ModelStore(fleet.home / f"node{i}" / "models", describe=digits_specs)
        unloadable = unloadable_onnx(tmp_path / "unloadable.onnx")
        assert store.add(unloadable, "digits", activate=False).version == "4"
    unready = subprocess.run([*command[:7], "4", *command[8:]], capture_output=True, text=True, timeout=120)
    assert unready.returncode == 1
    assert "stopped at n0" in unready.stderr
    assert "failed to load" in unready.stderr
    time.sleep(1.2)
    assert served(fleet) == {"n0": "2", "n1": "2"}
    back = subprocess.run(
        [*command[:4], "rollback", "digits", *command[8:]], capture_output=True, text=True, timeout=120
    )
    assert back.returncode == 0, back.stderr
    time.sleep(1.2)
    assert served(fleet) == {"n0": "1", "n1": "1"}  # the versions before the last rollout that went through
    refused = httpx.post(f"{fleet.url}/gateway/rollout", json={"model": "digits"})
    assert refused.status_code == 400  # neither a version nor a url


def test_a_config_change_reaches_every_node(fleet: GatewayProcess) -> None:
    command = [sys.executable, "-m", "edgegen", "admin", "config", "set", "cache.ttl_s=42.5",
               "batching.max_batch_size=8", "--gateway", fleet.url]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    for name in ("n0", "n1"):
        assert f"{name}: applied cache.ttl_s; at the next restart: batching.max_batch_size" in done.stderr
        config = httpx.get(f"{fleet.url}/gateway/config/{name}").json()
        assert config["settings"]["cache"]["ttl_s"] == 42.5  # at once
        assert config["settings"]["batching"]["max_batch_size"] == 32  # not before a restart
        assert config["remote"] == {"cache": {"ttl_s": 42.5}, "batching": {"max_batch_size": 8}}
    refusals = [({"cache.ttl_s": -1}, 400), ({"security.auth": False}, 403), ({"port": 1}, 403), ({}, 400),
                ({"nope.x": 1}, 400), ({"batching": 3}, 400), ({"log_level": "loud"}, 400)]  # fmt: skip
    for changes, status in refusals:
        refused = httpx.patch(f"{fleet.url}/gateway/config", json={"changes": changes})
        assert refused.status_code == status, (changes, refused.text)
    assert httpx.get(f"{fleet.url}/gateway/config/n1").json()["remote"]["cache"] == {
        "ttl_s": 42.5
    }  # untouched
    assert httpx.post(f"{fleet.url}/gateway/nodes/n0/restart", timeout=180).status_code == 200
    restarted = httpx.get(f"{fleet.url}/gateway/config/n0").json()["settings"]
    assert restarted["batching"]["max_batch_size"] == 8  # read from the remote settings at start
    assert restarted["cache"]["ttl_s"] == 42.5


def test_a_rollout_that_cannot_reach_a_node_stops_and_puts_back_what_it_changed(
    tmp_path: Path, model_files: dict[str, Path]
) -> None:
    """n1 is down when a rollout reaches it (connection refused; a node restarting or gone): the rollout
    stops there like at a failed gate, and n0, already on the new version, goes back. Before, the HTTP
    client's exception came out of the rollout as a 500: n0 stayed on the new version and nothing was
    kept to roll back."""
    good = tmp_path / "good.onnx"
    good.write_bytes(mlp_to_onnx(make_layers(seed=5)))
    nodes = []
    for i in range(2):
        store = fill_store(tmp_path / f"node{i}" / "models", model_files)
        assert store.add(good, "digits", activate=False).version == "2"
        nodes.append(NodeProcess(tmp_path / f"node{i}"))
    config = gateway_config(tmp_path / "gateway.toml", nodes, "[operations]\nobserve_s = 0.2\n")
    with running(nodes[0]), running(GatewayProcess(tmp_path, "--config", str(config))) as gateway:
        nodes[1].start()
        nodes[1].stop()  # down now, still in the fleet
        answer = httpx.post(
            f"{gateway.url}/gateway/rollout", json={"model": "digits", "version": "2"}, timeout=120
        )
        assert answer.status_code == 200, answer.text
        done = answer.json()
        assert (done["ok"], done["failed"]) == (False, "n1")
        assert "got no answer" in done["reason"]
        assert {(r["node"], r["version"], r["restored"]) for r in done["rolled_back"]} == {
            ("n1", None, True),  # nothing of it changed
            ("n0", "1", True),
        }
        models = httpx.get(f"{nodes[0].url}/admin/models").json()["models"]
        assert next(m["served"] for m in models if m["name"] == "digits") == "1"
