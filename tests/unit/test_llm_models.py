"""The tiny llama GGUF the tests write: llama.cpp loads it, tokenizes with it and decodes with it."""

from __future__ import annotations

import ctypes
import time
from collections.abc import Iterator
from pathlib import Path

import llama_cpp
import numpy as np
import pytest

from tests.llm_models import (
    BOS_ID,
    CHATML_TEMPLATE,
    ENDOFTEXT_ID,
    EOS_ID,
    EOT_ID,
    IM_END_ID,
    IM_START_ID,
    SPECIAL_TOKENS,
    _pretokenize,
    tiny_tokenizer_text,
    write_tiny_llama,
)

TEXT = "Hello world, the quick brown fox"
PROMPT = "<|im_start|>user\nTell me a story about the little girl.<|im_end|>\n<|im_start|>assistant\n"
N_CTX, N_BATCH, N_SEQ_MAX, N_THREADS = 512, 128, 4, 2


@llama_cpp.llama_log_callback
def _no_log(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    """Drops llama.cpp's log lines; module-level so ctypes never calls a collected callback."""


@pytest.fixture(scope="module", autouse=True)
def _quiet_llama() -> Iterator[None]:
    # llama.cpp logs every tensor on load; silence it for these tests and restore whatever was set.
    previous, user_data = llama_cpp.llama_log_callback(), ctypes.c_void_p()
    llama_cpp.llama_log_get(ctypes.byref(previous), ctypes.byref(user_data))
    llama_cpp.llama_log_set(_no_log, ctypes.c_void_p(0))
    yield
    llama_cpp.llama_log_set(previous, user_data)


@pytest.fixture(scope="module")
def gguf_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("llm") / "tiny.gguf")


@pytest.fixture(scope="module")
def model(gguf_path: Path) -> Iterator[llama_cpp.llama_model_p]:
    llama_cpp.llama_backend_init()
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = False
    loaded = llama_cpp.llama_model_load_from_file(str(gguf_path).encode(), params)
    assert loaded, "llama.cpp refused the tiny GGUF"
    yield loaded
    llama_cpp.llama_model_free(loaded)


@pytest.fixture(scope="module")
def vocab(model: llama_cpp.llama_model_p) -> llama_cpp.llama_vocab_p:
    return llama_cpp.llama_model_get_vocab(model)


@pytest.fixture
def ctx(model: llama_cpp.llama_model_p) -> Iterator[llama_cpp.llama_context_p]:
    params = llama_cpp.llama_context_default_params()
    params.n_ctx, params.n_batch, params.n_seq_max = N_CTX, N_BATCH, N_SEQ_MAX
    params.n_threads = params.n_threads_batch = N_THREADS
    context = llama_cpp.llama_init_from_model(model, params)
    assert context, "llama.cpp could not make a context"
    yield context
    llama_cpp.llama_free(context)


@pytest.fixture
def batch() -> Iterator[llama_cpp.llama_batch]:
    made = llama_cpp.llama_batch_init(N_BATCH, 0, N_SEQ_MAX)
    yield made
    llama_cpp.llama_batch_free(made)


def tokenize(vocab: llama_cpp.llama_vocab_p, text: str, *, special: bool = False) -> list[int]:
    raw = text.encode()
    buf = (llama_cpp.llama_token * (len(raw) + 8))()
    n = llama_cpp.llama_tokenize(vocab, raw, len(raw), buf, len(buf), False, special)
    assert n >= 0
    return list(buf[:n])


def piece(vocab: llama_cpp.llama_vocab_p, token: int) -> bytes:
    buf = ctypes.create_string_buffer(64)
    n = llama_cpp.llama_token_to_piece(vocab, token, buf, len(buf), 0, True)
    assert n >= 0
    return buf.raw[:n]


def decode(
    ctx: llama_cpp.llama_context_p, batch: llama_cpp.llama_batch, tokens: list[int], start: int, n_vocab: int
) -> np.ndarray:
    """Decode `tokens` at positions start.. in sequence 0; return the last position's logits."""
    batch.n_tokens = len(tokens)
    for i, token in enumerate(tokens):
        batch.token[i] = token
        batch.pos[i] = start + i
        batch.n_seq_id[i] = 1
        batch.seq_id[i][0] = 0
        batch.logits[i] = i == len(tokens) - 1
    assert llama_cpp.llama_decode(ctx, batch) == 0
    logits = llama_cpp.llama_get_logits_ith(ctx, len(tokens) - 1)
    return np.ctypeslib.as_array(logits, shape=(n_vocab,)).copy()


def test_same_seed_same_bytes_small_and_fast(tmp_path: Path) -> None:
    start = time.perf_counter()
    first = write_tiny_llama(tmp_path / "a.gguf").read_bytes()
    assert time.perf_counter() - start < 5.0
    assert len(first) < 8 * 1024 * 1024
    assert write_tiny_llama(tmp_path / "b.gguf").read_bytes() == first
    assert write_tiny_llama(tmp_path / "c.gguf", seed=1).read_bytes() != first


def test_vocabulary_and_special_tokens(vocab: llama_cpp.llama_vocab_p) -> None:
    n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
    assert 600 < n_vocab < 1024  # 3 specials + 256 bytes + a few hundred merges
    assert (llama_cpp.llama_vocab_bos(vocab), llama_cpp.llama_vocab_eos(vocab)) == (BOS_ID, EOS_ID)
    assert llama_cpp.llama_vocab_eot(vocab) == EOT_ID
    assert not llama_cpp.llama_vocab_get_add_bos(vocab)
    eog = {t for t in range(n_vocab) if llama_cpp.llama_vocab_is_eog(vocab, t)}
    assert eog == {ENDOFTEXT_ID, IM_END_ID}
    for token_id, text in enumerate(SPECIAL_TOKENS):
        assert tokenize(vocab, text, special=True) == [token_id]
        assert piece(vocab, token_id) == text.encode()


def test_tokenize_round_trip(vocab: llama_cpp.llama_vocab_p) -> None:
    tokens = tokenize(vocab, TEXT)
    # Every word of the training text is one token: "Hello", " world", ",", " the", ...
    assert len(tokens) == 7
    assert b"".join(piece(vocab, t) for t in tokens) == TEXT.encode()
    # Text outside the training set falls back to smaller pieces and bytes, and still round-trips.
    other = "Zebras zigzag 1234 café\t!"
    assert b"".join(piece(vocab, t) for t in tokenize(vocab, other)) == other.encode()
    # ...and so is every pre-token (word, punctuation run) of the text the merges were learnt from.
    whole = tiny_tokenizer_text()
    assert len(tokenize(vocab, whole)) == len(_pretokenize(whole))


def test_prompt_logits_are_finite_and_varied(
    vocab: llama_cpp.llama_vocab_p, ctx: llama_cpp.llama_context_p, batch: llama_cpp.llama_batch
) -> None:
    n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
    prompt = tokenize(vocab, PROMPT, special=True)
    assert prompt[0] == IM_START_ID
    logits = decode(ctx, batch, prompt, 0, n_vocab)
    assert np.isfinite(logits).all()
    assert len(np.unique(logits)) > n_vocab // 2
    # The special tokens sit far below everything the model may say.
    assert logits[list(range(len(SPECIAL_TOKENS)))].max() < -10.0
    assert np.sort(logits)[-1] - np.sort(logits)[-2] > 0.0  # a strict greedy winner


def test_greedy_decoding_is_varied_and_never_ends(
    vocab: llama_cpp.llama_vocab_p, ctx: llama_cpp.llama_context_p, batch: llama_cpp.llama_batch
) -> None:
    n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
    prompt = tokenize(vocab, PROMPT, special=True)
    logits = decode(ctx, batch, prompt, 0, n_vocab)
    generated: list[int] = []
    for step in range(32):
        token = int(np.argmax(logits))
        generated.append(token)
        logits = decode(ctx, batch, [token], len(prompt) + step, n_vocab)
    assert not any(llama_cpp.llama_vocab_is_eog(vocab, t) for t in generated)
    assert len(set(generated)) >= 16
    # The bias channel also keeps non-ASCII bytes out, so the text is printable ASCII (or newlines).
    text = b"".join(piece(vocab, t) for t in generated)
    assert all(0x20 <= b < 0x7F or b == 0x0A for b in text)


def test_chat_template_is_chatml(model: llama_cpp.llama_model_p) -> None:
    template = llama_cpp.llama_model_chat_template(model, None)
    assert template == CHATML_TEMPLATE.encode()
    messages = (llama_cpp.llama_chat_message * 2)(
        llama_cpp.llama_chat_message(b"system", b"You are terse."),
        llama_cpp.llama_chat_message(b"user", b"Hi there"),
    )
    buf = ctypes.create_string_buffer(1024)
    n = llama_cpp.llama_chat_apply_template(template, messages, 2, True, buf, len(buf))
    assert 0 < n <= len(buf), "llama.cpp did not recognise the template"
    expected = (
        "<|im_start|>system\nYou are terse.<|im_end|>\n"
        "<|im_start|>user\nHi there<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert buf.raw[:n].decode() == expected
    # The Jinja template itself (as an OpenAI-style server would render it) agrees.
    jinja2 = pytest.importorskip("jinja2")
    rendered = (
        jinja2.Environment(autoescape=False)
        .from_string(CHATML_TEMPLATE)
        .render(
            messages=[
                {"role": "system", "content": "You are terse."},
                {"role": "user", "content": "Hi there"},
            ],
            add_generation_prompt=True,
        )
    )
    assert rendered == expected
