"""Hostile model files and packages (red-team issue 14, items 4 and 12): one GGUF must not crash-loop a
node, and one small archive must not fill its disk or its memory.

A real HTTPS node (mutual TLS for admin calls, signed models only) with a home of its own, so that what
these tests push and activate touches no other module's store. The bad GGUFs are the tiny llama with one
value changed; a block count of a million made llama.cpp abort the node (GGML_ASSERT, SIGABRT), and,
pushed with `?activate=true`, ACTIVE named it before the load, so the node died again at every restart.
"""

from __future__ import annotations

import functools
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from gguf import GGUFReader

from edgegen.config import LlmSettings
from edgegen.errors import Unprocessable
from edgegen.executors import describe_model
from edgegen.executors.probe import probe_load
from edgegen.security.signing import Signer
from edgegen.store import ModelStore
from edgegen.store.manifest import Manifest, TensorSpec, sha256_file
from tests.e2e.node_process import NodeProcess, running
from tests.gguf_edits import Value, edited_gguf
from tests.hostile_archives import header, tar_gz_stream
from tests.llm_models import write_tiny_llama
from tests.security.conftest import Fleet, error_of, node_env

CHAT = {"model": "tiny-llm", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
# name → (what differs from the tiny llama, what the refusal says)
TOKEN_PAST_THE_END = "a token whose length runs past the end of the file"
BAD_GGUFS: dict[str, tuple[dict[str, Value | None], str]] = {
    "a million blocks": ({"llama.block_count": 1_000_000}, "llama.block_count is 1000000"),
    "kv heads not dividing the heads": (
        {"llama.attention.head_count_kv": 3},
        "does not divide the head count",
    ),
    "vocabulary size mismatch": ({"llama.vocab_size": 10_000}, "the token list holds 758 tokens"),
    "embedding width mismatch": (
        {"llama.embedding_length": 128, "llama.rope.dimension_count": 32},
        "'token_embd.weight' has shape [64, 758], but the metadata makes it [128, 758]",
    ),
    # No metadata edit makes this one: `cut_token` sets a token's length past the end of the file, deep in
    # the token list that the reader steps over without naming each item.
    TOKEN_PAST_THE_END: ({}, "'tokenizer.ggml.tokens'[500]: string length 1099511627776 runs past the end"),
}
ABORT = (sys.executable, "-c", "import os; os.abort()")  # a loader that crashes as llama.cpp's asserts do


class ModelsNode(NodeProcess):
    """A node of the fleet's PKI and keys, but with a home (and so a store and signing key) of its own."""

    scheme = "https"

    def __init__(self, fleet: Fleet, home: Path) -> None:
        super().__init__(home, env=node_env(fleet), auth=True)
        self.verify = fleet.client_tls()


def good_store(home: Path, model_files: dict[str, Path]) -> ModelStore:
    """digits and tiny-llm, version 1 of each, signed with `home`'s key (which the node there trusts)."""
    store = ModelStore(home / "models", signer=Signer.local(home), describe=describe_model)
    store.add(model_files["onnx"], "digits")
    store.add(write_tiny_llama(home / "tiny.gguf"), "tiny-llm", task="text-generation")
    return store


def package_dir(model: Path, directory: Path, signer: Signer) -> Path:
    """A signed GGUF package whose manifest is written by hand: our reader never sees the model on the
    way in, as with a package built elsewhere, or a version stored before the reader knew better."""
    directory.mkdir(parents=True)
    shutil.copyfile(model, directory / "model.gguf")
    Manifest(
        name="tiny-llm",
        version=directory.name,
        format="gguf",
        task="text-generation",
        inputs=[TensorSpec(name="tokens", dtype="int32", shape=(-1,))],
        outputs=[TensorSpec(name="logits", dtype="float32", shape=(-1, 758))],
        files={"model.gguf": sha256_file(directory / "model.gguf")},
    ).write(directory / "manifest.json")
    signer.sign(directory)
    return directory


def signed_archive(model: Path, out: Path, signer: Signer) -> bytes:
    """What `edgegen models export` would make of `model`: a signed package as one tar.gz."""
    package = package_dir(model, out.with_name(out.name + ".d") / "1", signer)
    with tarfile.open(out, "w:gz") as archive:
        for file in package.iterdir():
            archive.add(file, arcname=file.name)
    return out.read_bytes()


@pytest.fixture(scope="module")
def bad_ggufs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad-ggufs")
    good = write_tiny_llama(root / "good.gguf")
    files = {
        case: edited_gguf(good, root / f"bad-{i}.gguf", changes)
        for i, (case, (changes, _)) in enumerate(BAD_GGUFS.items())
    }
    cut_token(files[TOKEN_PAST_THE_END], 500)
    return files


def cut_token(path: Path, index: int) -> None:
    """Make token `index`'s length 2**40 in place: the file is otherwise the same."""
    tokens = GGUFReader(path).fields["tokenizer.ggml.tokens"]
    token = bytes(tokens.parts[tokens.data[index]])
    data = path.read_bytes()
    field = struct.pack("<Q", len(token)) + token
    assert data.count(field) == 1
    at = data.index(field)
    path.write_bytes(data[:at] + struct.pack("<Q", 2**40) + data[at + 8 :])


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory, model_files: dict[str, Path]) -> Path:
    home = tmp_path_factory.mktemp("model-files")
    good_store(home, model_files)
    return home


@pytest.fixture(scope="module")
def node(fleet: Fleet, home: Path) -> Iterator[ModelsNode]:
    with running(ModelsNode(fleet, home)) as process:
        yield process


def admin(fleet: Fleet, node: NodeProcess, method: str, path: str, **kwargs: object) -> httpx.Response:
    with fleet.admin_client() as client:
        return client.request(method, f"{node.url}{path}", **kwargs)  # type: ignore[arg-type]


def served(fleet: Fleet, node: NodeProcess) -> dict[str, dict[str, object]]:
    models = admin(fleet, node, "GET", "/admin/models").json()["models"]
    return {m["name"]: {k: m[k] for k in ("versions", "active", "served")} for m in models}


def assert_serving_version_1(fleet: Fleet, node: NodeProcess) -> None:
    """The node is alive, ACTIVE still names version 1 of each model, and the node serves them."""
    assert node.alive(), node.log()[-3000:]
    assert served(fleet, node) == {
        "digits": {"versions": ["1"], "active": "1", "served": "1"},
        "tiny-llm": {"versions": ["1"], "active": "1", "served": "1"},
    }
    assert (node.home / "models" / "tiny-llm" / "ACTIVE").read_text() == "1\n"
    chat = httpx.post(f"{node.url}/v1/chat/completions", json=CHAT, headers=fleet.headers("user"),
                      verify=node.verify, timeout=30)  # fmt: skip
    assert chat.status_code == 200, chat.text


# -- item 4: a GGUF that crashes llama.cpp ---------------------------------------------------------------
@pytest.mark.parametrize("case", BAD_GGUFS)
def test_models_add_refuses_a_gguf_llama_cpp_cannot_load(
    bad_ggufs: dict[str, Path], tmp_path: Path, case: str
) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "edgegen", "models", "add", str(bad_ggufs[case]), "--name", "evil"],
        env={"EDGEGEN_HOME": str(tmp_path / "home"), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("error:")
    assert BAD_GGUFS[case][1] in lines[0]
    assert not (tmp_path / "home" / "models" / "evil").exists()


@pytest.mark.parametrize("case", BAD_GGUFS)
def test_a_pushed_package_holding_such_a_gguf_is_refused_and_the_node_serves_on(
    node: ModelsNode, fleet: Fleet, home: Path, bad_ggufs: dict[str, Path], tmp_path: Path, case: str
) -> None:
    body = signed_archive(bad_ggufs[case], tmp_path / "bad.tar.gz", Signer.local(home))
    answer = admin(fleet, node, "PUT", "/admin/models/tiny-llm/package?activate=true", content=body)
    assert answer.status_code == 422, answer.text
    assert BAD_GGUFS[case][1] in error_of(answer)
    assert_serving_version_1(fleet, node)


def test_a_stored_version_that_would_crash_llama_cpp_is_not_activated(
    node: ModelsNode, fleet: Fleet, home: Path, bad_ggufs: dict[str, Path]
) -> None:
    """A version that reached the store past our reader (from before it knew better, or by hand): the
    activation loads it before ACTIVE is written, and refuses it."""
    version = package_dir(
        bad_ggufs["a million blocks"], home / "models" / "tiny-llm" / "9", Signer.local(home)
    )
    try:
        answer = admin(fleet, node, "POST", "/admin/models/tiny-llm/activate", json={"version": "9"})
        assert answer.status_code == 422, answer.text
        assert (
            error_of(answer)
            == "this model file does not load: llama.block_count is 1000000: it must be between 1 and 512"
        )
    finally:
        shutil.rmtree(version)
    assert_serving_version_1(fleet, node)


def test_the_node_restarts_after_the_refusals(node: ModelsNode, fleet: Fleet) -> None:
    node.stop()
    node.start()
    assert_serving_version_1(fleet, node)


def test_a_node_whose_active_version_crashes_llama_cpp_starts_and_serves_the_one_before(
    fleet: Fleet, tmp_path: Path, model_files: dict[str, Path], bad_ggufs: dict[str, Path]
) -> None:
    """ACTIVE naming such a version, as the push above left it before the fix: the node used to abort at
    every start. Now it starts, serves digits and the version before, and says so in its log."""
    good_store(tmp_path, model_files)
    package_dir(bad_ggufs["a million blocks"], tmp_path / "models" / "tiny-llm" / "2", Signer.local(tmp_path))
    (tmp_path / "models" / "tiny-llm" / "ACTIVE").write_text("2\n")
    with running(ModelsNode(fleet, tmp_path), expected=("active version not loaded",)) as node:
        assert served(fleet, node) == {
            "digits": {"versions": ["1"], "active": "1", "served": "1"},
            "tiny-llm": {"versions": ["1", "2"], "active": "2", "served": "1"},
        }
        chat = httpx.post(f"{node.url}/v1/chat/completions", json=CHAT, headers=fleet.headers("user"),
                          verify=node.verify, timeout=30)  # fmt: skip
        assert chat.status_code == 200, chat.text
        assert '"msg":"active version not loaded: serving an earlier one"' in node.log()
        assert "llama.block_count is 1000000" in node.log()


# -- the probe: a load that crashes is a refusal, not a dead node -----------------------------------------
@pytest.fixture
def llm_store(tmp_path: Path) -> ModelStore:
    store = ModelStore(tmp_path / "models", describe=describe_model)
    store.add(write_tiny_llama(tmp_path / "tiny.gguf"), "llm", task="text-generation")
    return store


def test_the_probe_loads_a_good_model_in_a_child(llm_store: ModelStore) -> None:
    package = llm_store.open("llm")
    try:
        probe_load(package, LlmSettings(max_num_seqs=2, ctx_per_seq=256, n_batch=64, threads=1))
    finally:
        package.close()


def test_the_probe_turns_a_crash_or_a_hang_into_a_refusal(llm_store: ModelStore) -> None:
    package = llm_store.open("llm")
    try:
        with pytest.raises(
            Unprocessable, match=r"^this model file does not load: llama\.cpp aborted \(SIGABRT\)$"
        ):
            probe_load(package, LlmSettings(), child=ABORT)
        began = time.monotonic()
        hang = (sys.executable, "-c", "import time; time.sleep(60)")
        with pytest.raises(Unprocessable, match="loading it took longer than 1 s"):
            probe_load(package, LlmSettings(), child=hang, timeout_s=1)
        assert time.monotonic() - began < 10  # killed, not waited for
    finally:
        package.close()


def test_a_probe_that_passed_is_remembered_for_those_files_and_settings(
    llm_store: ModelStore, tmp_path: Path
) -> None:
    """A node starting again does not load a version twice over; other settings are probed anew."""
    runs = tmp_path / "runs"
    counting = (sys.executable, "-c", f"open({str(runs)!r}, 'a').write('x')")
    package = llm_store.open("llm")
    try:
        for settings in (LlmSettings(), LlmSettings(), LlmSettings(max_num_seqs=2)):
            probe_load(package, settings, remember=tmp_path / "probed", child=counting)
        assert runs.read_text() == "xx"
        with pytest.raises(Unprocessable, match="aborted"):  # a refusal is never remembered as a pass
            probe_load(package, LlmSettings(n_batch=64), remember=tmp_path / "probed", child=ABORT)
        with pytest.raises(Unprocessable, match="aborted"):
            probe_load(package, LlmSettings(n_batch=64), remember=tmp_path / "probed", child=ABORT)
    finally:
        package.close()


def test_a_store_never_points_active_at_a_version_whose_load_crashes(llm_store: ModelStore) -> None:
    crashing = ModelStore(
        llm_store.root,
        probe=functools.partial(probe_load, settings=LlmSettings(), child=ABORT),
        describe=describe_model,
    )
    tiny = llm_store.open("llm").model_path
    with pytest.raises(Unprocessable, match=r"llama\.cpp aborted"):
        crashing.add(tiny, "llm", task="text-generation", activate=True)
    with pytest.raises(Unprocessable, match=r"llama\.cpp aborted"):
        crashing.activate("llm", "2")
    assert llm_store.versions("llm") == ["1", "2"]
    assert llm_store.active_version("llm") == "1"


# -- item 12, archive part: decompression bombs and huge headers --------------------------------------------
def io_written(node: NodeProcess) -> int:
    """Bytes the node process has passed to write() so far (/proc/PID/io wchar: files and sockets)."""
    assert node.process is not None
    for line in Path(f"/proc/{node.process.pid}/io").read_text().splitlines():
        if line.startswith("wchar:"):
            return int(line.split()[1])
    raise AssertionError("no wchar in /proc/PID/io")


def memory_kib(node: NodeProcess, field: str) -> int:
    assert node.process is not None
    for line in Path(f"/proc/{node.process.pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/PID/status")


def unpacking_leftovers(home: Path) -> list[Path]:
    """What an unpacking leaves behind: in the node's home, and where the old code put it (/tmp)."""
    temp = Path(tempfile.gettempdir())
    return [
        *(p for p in home.rglob("*") if p.name.startswith((".unpack-", ".staging-", "edgegen-push-"))),
        *temp.glob("edgegen-package-*"),
        *temp.glob(".unpack-*"),
    ]


def test_a_gzip_bomb_pushed_to_a_node_is_refused_before_it_fills_the_disk(
    node: ModelsNode, fleet: Fleet, home: Path, tmp_path: Path
) -> None:
    bomb = tar_gz_stream(tmp_path / "bomb.tar.gz", [(header("model.onnx", 1 << 30), b"\0")])
    assert bomb.stat().st_size < 2 << 20
    before = unpacking_leftovers(home)
    written = io_written(node)
    answer = admin(fleet, node, "PUT", "/admin/models/digits/package", content=bomb.read_bytes())
    assert answer.status_code in (413, 422), answer.text
    assert "unpacks to more than its limit of" in error_of(answer)
    # The body went to disk (about 1 MB) and the answer to the socket; not a byte of the gigabyte did.
    assert io_written(node) - written < bomb.stat().st_size + (4 << 20)
    assert unpacking_leftovers(home) == before
    assert_serving_version_1(fleet, node)


def test_a_long_name_header_pushed_to_a_node_is_refused_without_growing_its_memory(
    node: ModelsNode, fleet: Fleet, home: Path, tmp_path: Path
) -> None:
    archive = tar_gz_stream(
        tmp_path / "long.tar.gz",
        [
            (header("././@LongLink", 500 << 20, tarfile.GNUTYPE_LONGNAME), b"a"),
            (header("model.onnx", 1), b"x"),
        ],
    )
    assert archive.stat().st_size < 1 << 20
    assert node.process is not None
    before = unpacking_leftovers(home)
    # Reset the peak resident size to the current one: VmHWM then is the peak while the push is handled.
    Path(f"/proc/{node.process.pid}/clear_refs").write_text("5")
    resident = memory_kib(node, "VmRSS")
    answer = admin(fleet, node, "PUT", "/admin/models/digits/package", content=archive.read_bytes())
    assert answer.status_code == 422, answer.text[:300]
    assert "extended header of 524288000 bytes" in error_of(answer)
    assert memory_kib(node, "VmHWM") - resident < 24 << 10  # KiB: a few MB, not the 500 MB name
    assert unpacking_leftovers(home) == before
    assert_serving_version_1(fleet, node)
