"""llama.cpp executor over llama-cpp-python's low-level (ctypes) API.

One model, one context whose KV cache is one pool of `n_cells` cells shared by `n_seq` sequences (llama.cpp's
unified cache): a sequence takes the cells it uses, up to `n_ctx_seq`. The pool is sized from a budget in
MB (`kv_budget_mb`; by default min(32 MB, RAM/32), the RAM being the container's limit where there is one)
and the cache's element type (`kv_type`): the memory is allocated, and touched, when the context is made,
so it is what the node holds whether the sequences use it or not. A decode step is one `llama_decode` over
a `llama_batch` that mixes prompt chunks and single tokens of several sequences; logits are requested
only where the scheduler samples or scores a prompt (`echo`). The ctypes calls release the GIL, so a
decode in a worker thread leaves the event loop free.
"""

from __future__ import annotations

import ctypes
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import llama_cpp as llama
import numpy as np

from edgegen.config import KvType, LlmSettings
from edgegen.errors import ExecutorError, Unprocessable
from edgegen.executors.base import DecodeItem
from edgegen.executors.chat_template import ChatTemplate
from edgegen.executors.llama_grammar import LlamaGrammar, schema_grammar
from edgegen.store.gguf import read_gguf
from edgegen.store.gguf_hparams import check_language_model

log = logging.getLogger(__name__)


def _drop_log(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    """llama.cpp logs every tensor at load; the node logs what matters itself."""


# Held at module level: llama.cpp keeps calling this C function pointer for the life of the process.
_quiet = llama.llama_log_callback(_drop_log)


_backend_ready = False

# Bytes one cached value takes: f16, or ggml's blocks of 32 values (q8_0: 34 bytes, q4_0: 18 bytes).
KV_BYTES: dict[KvType, float] = {"f16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}
_GGML_TYPES: dict[KvType, int] = {
    "f16": llama.GGML_TYPE_F16,
    "q8_0": llama.GGML_TYPE_Q8_0,
    "q4_0": llama.GGML_TYPE_Q4_0,
}
_QUANT_BLOCK = 32  # values per q8_0 / q4_0 block
# The default budget: 32 MB (a node with SmolLM2 and both classifiers stays under 300 MB), less on a
# machine with under 1 GB (a 32nd of its memory). docs/benchmarks.md, "What a node holds".
AUTO_KV_BYTES = 32 << 20
_CELL_BLOCK = 256  # llama.cpp rounds a context up to a multiple of 256 cells
_CGROUP_LIMIT = Path("/sys/fs/cgroup/memory.max")


def memory_limit() -> int:
    """The bytes this process may use: the machine's memory, or a lower cgroup (container) limit."""
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        limit = _CGROUP_LIMIT.read_text().strip()
    except OSError:
        return physical
    return min(physical, int(limit)) if limit.isdigit() else physical


def auto_kv_budget() -> int:
    """Bytes of KV cache a model gets when `kv_budget_mb` is 0."""
    return min(AUTO_KV_BYTES, memory_limit() // 32)


def kv_cells(settings: LlmSettings, bytes_per_cell: float, n_ctx_seq: int) -> int:
    """Cells in the shared pool: the budget's worth, at least one whole context, at most every slot's whole
    context (more could never be used)."""
    budget = settings.kv_budget_mb * (1 << 20) or auto_kv_budget()
    cells = int(budget // bytes_per_cell) // _CELL_BLOCK * _CELL_BLOCK
    return max(n_ctx_seq, min(cells, settings.max_num_seqs * n_ctx_seq))


def init_backend() -> None:
    global _backend_ready
    if not _backend_ready:
        llama.llama_log_set(_quiet, ctypes.c_void_p(0))
        llama.llama_backend_init()
        _backend_ready = True


class LlamaExecutor:
    def __init__(self, path: Path, settings: LlmSettings | None = None) -> None:
        """Load the model at `path` and a context for `settings.max_num_seqs` sequences.

        The file is checked by our own reader first (format and hyperparameters): llama.cpp aborts the
        process on some malformed models instead of failing the load. Raises IntegrityError, ExecutorError.
        """
        check_language_model(read_gguf(path))
        settings = settings or LlmSettings()
        init_backend()
        model_params = llama.llama_model_default_params()
        model_params.n_gpu_layers = 0
        self._model = llama.llama_model_load_from_file(str(path).encode(), model_params)
        if not self._model:
            raise ExecutorError("llama.cpp could not load the model")
        self._vocab = llama.llama_model_get_vocab(self._model)
        self.n_vocab = llama.llama_vocab_n_tokens(self._vocab)
        self.n_ctx_train = llama.llama_model_n_ctx_train(self._model)
        self.n_seq = settings.max_num_seqs
        self.n_ctx_seq = min(settings.ctx_per_seq, self.n_ctx_train)
        # K and V of every layer: n_head_kv heads of n_embd / n_head values each.
        head = llama.llama_model_n_embd(self._model) // max(llama.llama_model_n_head(self._model), 1)
        values = 2 * llama.llama_model_n_layer(self._model) * llama.llama_model_n_head_kv(self._model) * head
        self.kv_type: KvType = settings.kv_type
        if self.kv_type != "f16" and head % _QUANT_BLOCK:
            # llama.cpp quantizes a head's values in blocks of 32 and refuses the context otherwise.
            log.warning(
                "KV cache kept in f16: this model's attention heads hold %d values, not blocks of %d",
                head,
                _QUANT_BLOCK,
                extra={"kv_type": settings.kv_type},
            )
            self.kv_type = "f16"
        self.kv_bytes_per_cell = values * KV_BYTES[self.kv_type]
        # Attention reads a cell's key and value for every head of every layer, 2·n_embd·n_layer multiply-
        # adds per token decoded (masked cells of other sequences too: the pool is one); a token's own
        # compute is about one multiply-add per parameter.
        n_embd, n_layer = llama.llama_model_n_embd(self._model), llama.llama_model_n_layer(self._model)
        self.cell_cost = 2 * n_embd * n_layer / max(llama.llama_model_n_params(self._model), 1)
        self.n_cells = kv_cells(settings, self.kv_bytes_per_cell, self.n_ctx_seq)
        threads = settings.threads or os.cpu_count() or 1
        params = llama.llama_context_default_params()
        params.n_ctx = self.n_cells
        params.type_k = params.type_v = _GGML_TYPES[self.kv_type]
        if self.kv_type != "f16":  # llama.cpp reads a quantized V cache only in its flash-attention path
            params.flash_attn_type = llama.LLAMA_FLASH_ATTN_TYPE_ENABLED
        params.n_batch = settings.n_batch
        params.n_ubatch = settings.n_batch
        params.n_seq_max = self.n_seq
        params.n_threads = threads
        params.n_threads_batch = threads
        params.no_perf = True
        # One KV pool shared by all sequences: a sequence takes what it uses, a long chat more than others.
        params.kv_unified = True
        self._ctx = llama.llama_init_from_model(self._model, params)
        if not self._ctx:
            llama.llama_model_free(self._model)
            raise ExecutorError("llama.cpp could not create a context (out of memory?)")
        self._memory = llama.llama_get_memory(self._ctx)
        self._batch_size = settings.n_batch
        self._batch = llama.llama_batch_init(self._batch_size, 0, 1)
        template = llama.llama_model_chat_template(self._model, None)
        self.chat_template: str | None = template.decode() if template else None
        self._jinja = self._compile_chat_template()
        self.chat_takes_tools = self._jinja is not None and self._jinja.takes_tools
        self._pieces: dict[int, bytes] = {}

    # -- text ----------------------------------------------------------------------------------------
    def tokenize(self, text: str, *, special: bool) -> list[int]:
        data = text.encode()
        room = len(data) + 16
        tokens = (llama.llama_token * room)()
        n = llama.llama_tokenize(self._vocab, data, len(data), tokens, room, False, special)
        if n < 0:  # more tokens than bytes + 16 cannot happen with a byte-level vocabulary, but be exact
            room = -n
            tokens = (llama.llama_token * room)()
            n = llama.llama_tokenize(self._vocab, data, len(data), tokens, room, False, special)
        return list(tokens[:n])

    def piece(self, token: int) -> bytes:
        cached = self._pieces.get(token)
        if cached is None:
            buf = ctypes.create_string_buffer(64)
            n = llama.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False)
            if n < 0:
                buf = ctypes.create_string_buffer(-n)
                n = llama.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False)
            cached = self._pieces[token] = buf.raw[:n]
        return cached

    def is_end(self, token: int) -> bool:
        return bool(llama.llama_vocab_is_eog(self._vocab, token))

    def _vocab_text(self, token: int) -> str:
        """A token's text as the vocabulary spells it (`<|im_start|>`); "" for no token (-1)."""
        return "" if token < 0 else llama.llama_vocab_get_text(self._vocab, token).decode(errors="replace")

    def _compile_chat_template(self) -> ChatTemplate | None:
        """The model's chat template compiled for Jinja: None without one, or when it does not compile
        (then llama.cpp's built-in rendering of the family it recognises stands in)."""
        if self.chat_template is None:
            return None
        try:
            return ChatTemplate(
                self.chat_template,
                bos_token=self._vocab_text(llama.llama_vocab_bos(self._vocab)),
                eos_token=self._vocab_text(llama.llama_vocab_eos(self._vocab)),
            )
        except ExecutorError as exc:
            log.warning("%s; llama.cpp's built-in template of its family is used instead", exc.message)
            return None

    def render_chat(
        self, messages: Sequence[Mapping[str, object]], tools: Sequence[Mapping[str, object]] | None = None
    ) -> str:
        """The chat as the model's own Jinja chat template writes it, with the assistant's turn opened.

        The template's text is the whole prompt: tokenized without llama.cpp's automatic BOS (`tokenize`),
        so a template that writes `{{ bos_token }}` gets one BOS, and one that does not gets none, as with
        transformers. `tools` (OpenAI's tool definitions) reach a template that takes them
        (`chat_takes_tools`); llama.cpp's built-in rendering takes none. Raises ExecutorError, InvalidInput
        (the template refused the chat), Unprocessable.
        """
        if self.chat_template is None:
            raise ExecutorError("this model has no chat template; use /v1/completions")
        if self._jinja is not None:
            return self._jinja.render(messages, tools=tools)
        if tools:
            raise Unprocessable("this model's chat template cannot be rendered with tools")
        keep = [(str(m["role"]).encode(), str(m["content"]).encode()) for m in messages]
        chat = (llama.llama_chat_message * len(keep))(*[llama.llama_chat_message(r, c) for r, c in keep])
        template = self.chat_template.encode()
        size = sum(len(r) + len(c) for r, c in keep) * 2 + 256
        buf = ctypes.create_string_buffer(size)
        n = llama.llama_chat_apply_template(template, chat, len(keep), True, buf, size)
        if n > size:
            buf = ctypes.create_string_buffer(n)
            n = llama.llama_chat_apply_template(template, chat, len(keep), True, buf, n)
        if n < 0:
            raise ExecutorError("llama.cpp does not know this model's chat template")
        return buf.raw[:n].decode(errors="replace")

    # -- compute ----------------------------------------------------------------------------------------
    def decode(self, items: Sequence[DecodeItem]) -> list[np.ndarray]:
        batch = self._batch
        n = 0
        outputs: list[int] = []
        for item in items:
            for offset, token in enumerate(item.tokens):
                if n >= self._batch_size:
                    raise ExecutorError(f"a decode step may carry at most {self._batch_size} tokens")
                batch.token[n] = token
                batch.pos[n] = item.pos + offset
                batch.n_seq_id[n] = 1
                batch.seq_id[n][0] = item.seq
                wanted = item.logits and (item.every or offset == len(item.tokens) - 1)
                batch.logits[n] = wanted
                if wanted:
                    outputs.append(n)
                n += 1
        batch.n_tokens = n
        status = llama.llama_decode(self._ctx, batch)
        if status != 0:
            raise ExecutorError(f"llama_decode failed with status {status}")
        return [
            np.ctypeslib.as_array(llama.llama_get_logits_ith(self._ctx, i), shape=(self.n_vocab,))
            for i in outputs
        ]

    def json_grammar(self, schema: Mapping[str, Any] | None) -> LlamaGrammar:
        return LlamaGrammar(self._vocab, self.n_vocab, schema_grammar(schema))

    def forget(self, seq: int, start: int) -> None:
        llama.llama_memory_seq_rm(self._memory, seq, start, -1)

    def share(self, src: int, dst: int, length: int) -> None:
        # With a unified KV cache this tags the same cells with a second sequence id: no copy.
        llama.llama_memory_seq_cp(self._memory, src, dst, 0, length)

    def close(self) -> None:
        if self._ctx:
            llama.llama_batch_free(self._batch)
            llama.llama_free(self._ctx)
            llama.llama_model_free(self._model)
            self._ctx = None
