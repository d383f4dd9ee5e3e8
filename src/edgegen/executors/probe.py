"""Load a language model in a child process first, so that a model which crashes llama.cpp crashes only
the child.

llama.cpp ends the whole process on a failed `GGML_ASSERT` (abort(), exit status 134), and its loader
and graph builder assert on what a model file says. Our reader (store/gguf.py, store/gguf_hparams.py)
refuses what we know of; this catches the rest. Before a node serves a GGUF version it has not served
yet, and before anything points ACTIVE at one, the version is loaded here — our reader, llama.cpp's
loader, a context sized by the node's settings, one decode step — in

    python -P -m edgegen.executors.probe PATH LLM_SETTINGS_JSON MEMORY_CAP

under a deadline and a memory cap. A child that dies, fails or overruns is a refusal:

    >>> probe_load(package, settings.llm)   # doctest: +SKIP
    Unprocessable: this model file does not load: llama.cpp aborted (SIGABRT)

ONNX and TFLite models are not probed: ONNX Runtime and LiteRT report a model they cannot load as a
Python exception, which the registry already turns into a refusal, and a probe would only double
their load time.

A probe that passed is remembered (`remember`: a folder under the node's home) by what decides it — the
files' sha256, llama.cpp's build and the settings the model was loaded with —, so a node starting again,
or a version activated by the CLI and then served, is not loaded twice over (about a second each).

The child is started with `subprocess` (posix_spawn/vfork and exec, never a bare fork of a process
with threads). A model encrypted at rest is handed over as the memfd it is held in (`pass_fds`), so its
plaintext still never touches the disk.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import os
import resource
import signal
import subprocess  # nosec B404
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from edgegen.config import LlmSettings
from edgegen.errors import EdgegenError, IntegrityError, Unprocessable
from edgegen.store.gguf import read_gguf
from edgegen.store.gguf_hparams import check_language_model
from edgegen.store.store import ModelPackage

log = logging.getLogger(__name__)

PROBED_FORMATS = ("gguf",)
TIMEOUT_S = 300.0  # a large model read cold from a slow disk, then one decode step on the CPU
# Beyond the model's own bytes and its KV cache: the interpreter, llama.cpp's compute buffers, threads.
MEMORY_SLACK = 2 << 30
FAILURE = "edgegen-probe: "  # how the child's last line says why the model did not load
# -P: the working directory is not put on sys.path, so nothing there can pass for edgegen.
CHILD = (sys.executable, "-P", "-m", "edgegen.executors.probe")


def probed(home: Path) -> Path:
    """Where a node (and the CLI on its machine) remembers the probes that passed."""
    return home / "cache" / "probed"


def probe_load(
    package: ModelPackage,
    settings: LlmSettings,
    *,
    remember: Path | None = None,
    timeout_s: float = TIMEOUT_S,
    child: Sequence[str] = CHILD,
) -> None:
    """Load `package` in a child process, or raise Unprocessable saying why it does not load.

    Formats other than GGUF pass at once. With `remember` (a folder), a probe that passed is noted there
    and not run again for the same files, llama.cpp and settings. `child` is the command that loads the
    model (tests point it at one that crashes); it gets the model's path, the settings as JSON and the
    memory cap in bytes.
    """
    if package.manifest.format not in PROBED_FORMATS:
        return
    path = package.model_path
    passed = remember / _probe_key(package, settings) if remember is not None else None
    if passed is not None and passed.exists():
        return  # (the executor's own load runs our reader again, as every load of a GGUF does)
    # Our own reader first, in this process: it only reads, and it sizes the memory cap. A version
    # added before the reader knew what it knows now is refused here.
    try:
        shape = check_language_model(read_gguf(path))
    except IntegrityError as exc:
        raise Unprocessable(f"this model file does not load: {exc.message}") from None
    n_ctx = min(settings.ctx_per_seq, shape.n_ctx_train) * settings.max_num_seqs
    cap = 2 * path.stat().st_size + shape.kv_bytes_per_token * n_ctx + MEMORY_SLACK
    command = [*child, str(path), settings.model_dump_json(), str(cap)]
    fds = (package.plain_fd,) if package.plain_fd is not None else ()
    with tempfile.TemporaryFile() as output:  # a file, not a pipe: whatever the child prints, nothing blocks
        # A fixed interpreter and module, an argv list (no shell).
        process = subprocess.Popen(  # nosec B603
            command,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=output,
            pass_fds=fds,
            start_new_session=True,  # its own process group, killed whole on a timeout
            env={**os.environ, "GGML_NO_BACKTRACE": "1"},  # ggml would run gdb on itself on an abort
        )
        try:
            status = process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            raise Unprocessable(
                f"this model file does not load: loading it took longer than {timeout_s:g} s"
            ) from None
        if status == 0:
            if passed is not None:
                passed.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                passed.touch()
            return
        output.seek(max(0, output.seek(0, os.SEEK_END) - 4096))
        tail = output.read().decode(errors="replace")
    reason = _reason(status, tail)
    log.warning("model probe failed", extra={"model": package.manifest.name,
                                             "version": package.manifest.version, "reason": reason,
                                             "output": tail[-1000:]})  # fmt: skip
    raise Unprocessable(f"this model file does not load: {reason}")


def _probe_key(package: ModelPackage, settings: LlmSettings) -> str:
    """What a passed probe is remembered by: the files (their sha256, checked when the package was
    opened), the llama.cpp build that loaded them and the settings it loaded them with."""
    decided = "\n".join(
        [
            *(f"{name} {digest}" for name, digest in sorted(package.manifest.files.items())),
            importlib.metadata.version("llama_cpp_python"),
            settings.model_dump_json(),
        ]
    )
    return hashlib.sha256(decided.encode()).hexdigest()


def _reason(status: int, output: str) -> str:
    """Why the child failed, in words a client may read (no paths: llama.cpp's messages hold some)."""
    if status < 0:
        name = signal.Signals(-status).name if -status in signal.valid_signals() else str(-status)
        return f"llama.cpp aborted ({name})" if -status == signal.SIGABRT else f"the loader died ({name})"
    lines = [line for line in output.splitlines() if line.startswith(FAILURE)]
    if lines:
        return lines[-1].removeprefix(FAILURE)
    if status == 128 + signal.SIGABRT:
        return "llama.cpp aborted (SIGABRT)"
    return f"the loader exited with status {status}"


def _contain(memory_cap: int) -> None:
    """Make this child the first the kernel's OOM killer takes, and cap the memory it may write to
    (RLIMIT_DATA: the heap and anonymous mappings; the mapped model file does not count)."""
    try:
        with open("/proc/self/oom_score_adj", "w", encoding="ascii") as adj:
            adj.write("1000")
    except OSError:
        log.debug("oom_score_adj not set")
    resource.setrlimit(resource.RLIMIT_DATA, (memory_cap, memory_cap))


def main(argv: Sequence[str]) -> int:
    """The child: load the model as a node would, decode one token, exit 0; or say why not, exit 1."""
    path, settings_json, memory_cap = argv
    _contain(int(memory_cap))
    # Imported here, in the child only: the node's own process imports llama.cpp when it serves a model.
    from edgegen.executors.base import DecodeItem
    from edgegen.executors.llamacpp import LlamaExecutor

    try:
        executor = LlamaExecutor(Path(path), LlmSettings.model_validate_json(settings_json))
        try:
            first = executor.tokenize("Hello", special=False)[:1] or [0]
            executor.decode([DecodeItem(seq=0, tokens=first, pos=0, logits=True)])
        finally:
            executor.close()
    except EdgegenError as exc:
        print(f"{FAILURE}{exc.message}", file=sys.stderr, flush=True)
        return 1
    except MemoryError:
        print(f"{FAILURE}loading it needs more than {int(memory_cap) >> 20} MiB", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
