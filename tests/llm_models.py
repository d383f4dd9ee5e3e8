"""A tiny llama-architecture GGUF that the tests write themselves, so no test ever downloads a model.

`write_tiny_llama` writes a random-weight model (well under 1 MB) that the llama.cpp inside
llama-cpp-python loads, tokenizes with and decodes with, shaped like SmolLM2-Instruct:

* Tokenizer: a self-contained byte-level BPE ("gpt2" model, "smollm" pre-tokenizer). Ids 0..2 are
  the special tokens `<|endoftext|>`, `<|im_start|>`, `<|im_end|>` (type CONTROL, at the same ids
  as in SmolLM2); ids 3..258 are the 256 byte tokens spelled in GPT-2's byte-to-unicode alphabet;
  then one token per merge learnt from `tiny_tokenizer_text()`, so common English words (and every
  word of that text) are single tokens. bos = `<|im_start|>`, eos = `<|im_end|>`,
  eot = `<|endoftext|>`; no bos is added when tokenizing.
* Chat template: SmolLM2-Instruct's ChatML Jinja template, verbatim (it adds a default system turn
  when the conversation has none). llama.cpp recognises it as "chatml".
* Weights: float32, drawn from `numpy.random.default_rng(seed)`, so the file is byte-for-byte the
  same for a given seed. Two deliberate structures make the model useful to tests:
  - The unembedding is a random *permutation* of the token embeddings over the "text" tokens
    (words and printable ASCII bytes): the strongest logit after token t is the token after t on
    one long random cycle (about 600 tokens). Purely random tiny transformers tend to fall into
    repeating one token under greedy decoding; this one walks through hundreds of different tokens.
    The random attention and MLP layers still move the logits (by up to about 1) with the context,
    but not enough to change the greedy choice.
  - Residual channel 0 is a constant "bias channel" (see `_weights`), which gives the special and
    non-printable byte tokens a strictly negative logit. Greedy decoding therefore never emits an
    end-of-generation token, and generated text is always printable ASCII.
"""

from __future__ import annotations

import itertools
import re
from collections import Counter
from functools import cache
from pathlib import Path

import numpy as np
from gguf import GGUFWriter, LlamaFileType, TokenType

ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS: tuple[str, ...] = (ENDOFTEXT, IM_START, IM_END)
ENDOFTEXT_ID, IM_START_ID, IM_END_ID = 0, 1, 2
BOS_ID, EOS_ID, EOT_ID = IM_START_ID, IM_END_ID, ENDOFTEXT_ID
N_BYTE_TOKENS = 256
FIRST_BYTE_ID = len(SPECIAL_TOKENS)
N_MERGES = 512

# SmolLM2-Instruct's tokenizer_config.json chat_template, verbatim.
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}"
)

# llama.cpp maps "smollm" to the GPT-2 regex with each digit split off first (what SmolLM2 ships).
# An unknown name (even "gpt2": GPT-2's own pre-tokenizer is spelled "gpt-2") makes the model fail to
# load; a missing one falls back to "default" with a warning.
PRE_TOKENIZER = "smollm"

# Residual-stream channel that carries a constant (see `_weights`).
BIAS_CHANNEL = 0
# Logit (in units of the normalised bias channel, about 1) given to tokens the model must not emit.
SUPPRESSED_LOGIT = -30.0
# Gain of the unembedding: the "next on the cycle" token gets a logit of about 7, the others about
# N(0, 1), so greedy decoding follows the cycle while sampling at temperature 1 still varies.
UNEMBED_GAIN = 1.0
# Each attention/MLP block adds about this much (per-channel std) to a residual stream of std 1:
# enough that logits depend on the context, too little to drown the cycle.
RESIDUAL_SCALE = 0.4


def tiny_tokenizer_text() -> str:
    """The fixed English text the BPE merges are learnt from (ASCII, no digits, no `<|`)."""
    return (
        "Hello world, the quick brown fox jumps over the lazy dog. "
        "The quick brown fox is quick and the lazy dog is lazy. "
        "Hello there! How are you today? I am fine, thank you, and how are you? "
        "This is a small model that we use in the tests. It does not know anything, "
        "but it can read and write text with a real tokenizer. "
        "The model has a few layers and a small vocabulary of common English words. "
        "Once upon a time there was a little girl who lived in a village near the forest. "
        "Whenever she went out, the little girl wore a red riding cloak, so everyone in the village "
        "called her Little Red Riding Hood. One morning her mother said to her: "
        "take this basket of bread and butter to your grandmother, who is not well. "
        "What is the weather like? The weather is nice and the sun is shining. "
        "Please tell me a story about a cat and a dog who were the best of friends. "
        "You are a helpful assistant. Answer the question in one short sentence. "
        "The user asks, and the assistant answers with what it knows. "
        "We want to have time for people, for work, for good food and for a long walk in the park. "
        "She said that they would come back here when the day was over, because it was getting late. "
        "He could not see the house from where he was, but he knew it was there. "
        "There is no place like home. Where do you want to go? Let us go there together now. "
        "Can you help me with this? Yes, I can help you with that. No, I do not think so. "
        "first second third new old good great long little right big high different small large "
        "next early young important few public bad same able people year way day thing man woman "
        "child world life hand part eye place week case point government company number group "
        "problem fact be have do say get make go know take see come think look want give use find "
        "tell ask work seem feel try leave call"
    )


@cache
def _byte_to_unicode() -> tuple[str, ...]:
    """GPT-2's byte-to-unicode table: printable bytes map to themselves, the rest to U+0100 and up.

    Byte-level BPE vocabularies spell every token in this alphabet, and llama.cpp looks byte
    fallbacks up by these spellings, so the 256 byte tokens must be exactly these characters.
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table: dict[int, int] = {b: b for b in printable}
    extra = 0
    for b in range(N_BYTE_TOKENS):
        if b not in table:
            table[b] = N_BYTE_TOKENS + extra
            extra += 1
    return tuple(chr(table[b]) for b in range(N_BYTE_TOKENS))


# The "smollm" pre-tokenizer, for ASCII text: digits one at a time, then GPT-2's regex (\p{L} is
# approximated by [^\W\d_], enough for the fixed training text). Training must split words the way
# llama.cpp will, or merges would be learnt that can never apply.
_DIGIT = re.compile(r"(\d)")
_GPT2_SPLIT = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d| ?[^\W\d_]+| ?\d+| ?(?:[^\s\w]|_)+|\s+(?!\S)|\s+")


def _pretokenize(text: str) -> list[str]:
    words: list[str] = []
    for part in _DIGIT.split(text):
        words.extend(_GPT2_SPLIT.findall(part))
    return words


def _train_merges(text: str, n_merges: int) -> list[tuple[str, str]]:
    """Plain BPE training: repeatedly merge the most frequent adjacent pair (ties: smallest pair)."""
    alphabet = _byte_to_unicode()
    counts = Counter("".join(alphabet[b] for b in w.encode()) for w in _pretokenize(text))
    seqs = {word: list(word) for word in counts}
    merges: list[tuple[str, str]] = []
    while len(merges) < n_merges:
        pairs: Counter[tuple[str, str]] = Counter()
        for word, seq in seqs.items():
            for pair in itertools.pairwise(seq):
                pairs[pair] += counts[word]
        if not pairs:
            break  # every training word is a single token
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        for word, seq in seqs.items():
            merged: list[str] = []
            i = 0
            while i < len(seq):
                if i + 1 < len(seq) and (seq[i], seq[i + 1]) == best:
                    merged.append(seq[i] + seq[i + 1])
                    i += 2
                else:
                    merged.append(seq[i])
                    i += 1
            seqs[word] = merged
    return merges


@cache
def _vocab() -> tuple[tuple[str, ...], tuple[int, ...], tuple[str, ...]]:
    """(tokens, token types, merges "a b"): specials, then byte tokens, then one token per new merge."""
    merges = _train_merges(tiny_tokenizer_text(), N_MERGES)
    tokens = [*SPECIAL_TOKENS, *_byte_to_unicode()]
    seen = set(tokens)
    for left, right in merges:
        # Two merges can spell the same token ("ab"+"c" and "a"+"bc"): one id per spelling.
        if left + right not in seen:
            seen.add(left + right)
            tokens.append(left + right)
    types = [int(TokenType.CONTROL)] * len(SPECIAL_TOKENS) + [int(TokenType.NORMAL)] * (
        len(tokens) - len(SPECIAL_TOKENS)
    )
    return tuple(tokens), tuple(types), tuple(f"{a} {b}" for a, b in merges)


def _text_token_mask(tokens: tuple[str, ...]) -> np.ndarray:
    """True for tokens the model may emit: merged words and byte tokens of printable ASCII or newline."""
    decode = {c: b for b, c in enumerate(_byte_to_unicode())}
    mask = np.zeros(len(tokens), dtype=bool)
    for i, tok in enumerate(tokens[FIRST_BYTE_ID:], start=FIRST_BYTE_ID):
        raw = bytes(decode[c] for c in tok)
        mask[i] = all(0x20 <= b < 0x7F or b == 0x0A for b in raw)
    return mask


def _weights(
    rng: np.random.Generator,
    n_vocab: int,
    emit: np.ndarray,
    *,
    n_embd: int,
    n_layer: int,
    n_head: int,
    n_head_kv: int,
    n_ff: int,
) -> dict[str, np.ndarray]:
    """All tensors, in numpy order (rows = output features; the writer reverses to ggml's order).

    Bias channel: llama has no output bias, so one is built from the residual stream. Every token
    embedding holds 1.0 in channel BIAS_CHANNEL and no block writes to that channel (its row of
    attn_output and ffn_down is zero), so it reaches the final RMSNorm as exactly 1.0 and leaves it
    as 1/rms(x) > 0 (output_norm is all ones). A token whose output row is zero except
    SUPPRESSED_LOGIT in that channel thus always gets a logit of SUPPRESSED_LOGIT/rms(x) < 0 (around
    -30), while text tokens have a zero there and logits unaffected by it. A greedy or low-temperature
    decoder never picks the suppressed tokens, but they remain ordinary, reachable vocabulary entries.
    """
    head_dim = n_embd // n_head

    def dense(n_out: int, n_in: int, scale: float = 1.0) -> np.ndarray:
        # Variance 1/n_in keeps activations at unit scale through each projection.
        return (rng.standard_normal((n_out, n_in)) * (scale / np.sqrt(n_in))).astype(np.float32)

    embd = rng.standard_normal((n_vocab, n_embd)).astype(np.float32)
    embd[:, BIAS_CHANNEL] = 1.0
    tensors: dict[str, np.ndarray] = {"token_embd.weight": embd}
    for layer in range(n_layer):
        attn_out = dense(n_embd, n_head * head_dim, RESIDUAL_SCALE)
        ffn_down = dense(n_embd, n_ff, RESIDUAL_SCALE)
        attn_out[BIAS_CHANNEL] = 0.0
        ffn_down[BIAS_CHANNEL] = 0.0
        tensors |= {
            f"blk.{layer}.attn_norm.weight": np.ones(n_embd, dtype=np.float32),
            f"blk.{layer}.attn_q.weight": dense(n_head * head_dim, n_embd),
            f"blk.{layer}.attn_k.weight": dense(n_head_kv * head_dim, n_embd),
            f"blk.{layer}.attn_v.weight": dense(n_head_kv * head_dim, n_embd),
            f"blk.{layer}.attn_output.weight": attn_out,
            f"blk.{layer}.ffn_norm.weight": np.ones(n_embd, dtype=np.float32),
            f"blk.{layer}.ffn_gate.weight": dense(n_ff, n_embd),
            f"blk.{layer}.ffn_up.weight": dense(n_ff, n_embd),
            f"blk.{layer}.ffn_down.weight": ffn_down,
        }

    # Unembedding: the row of token cycle[k+1] is the (unit, content-channel) embedding of
    # cycle[k], so after reading token cycle[k] the largest logit is cycle[k+1]'s.
    content = np.ones(n_embd, dtype=bool)
    content[BIAS_CHANNEL] = False
    unit = embd[:, content] / np.linalg.norm(embd[:, content], axis=1, keepdims=True)
    cycle = rng.permutation(np.flatnonzero(emit))
    output = np.zeros((n_vocab, n_embd), dtype=np.float32)
    output[np.ix_(np.roll(cycle, -1), content)] = unit[cycle] * UNEMBED_GAIN
    output[~emit, BIAS_CHANNEL] = SUPPRESSED_LOGIT
    tensors["output_norm.weight"] = np.ones(n_embd, dtype=np.float32)
    tensors["output.weight"] = output
    return tensors


def write_tiny_llama(
    path: Path,
    *,
    seed: int = 0,
    n_embd: int = 64,
    n_layer: int = 2,
    n_head: int = 4,
    n_head_kv: int = 2,
    n_ff: int = 128,
    n_ctx_train: int = 2048,
) -> Path:
    """Write the tiny model to `path` (same bytes for the same arguments) and return `path`."""
    if n_embd % n_head or n_head % n_head_kv:
        raise ValueError("n_embd must divide by n_head, and n_head by n_head_kv")
    tokens, types, merges = _vocab()
    emit = _text_token_mask(tokens)
    tensors = _weights(
        np.random.default_rng(seed),
        len(tokens),
        emit,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        n_head_kv=n_head_kv,
        n_ff=n_ff,
    )

    writer = GGUFWriter(path, "llama")
    writer.add_name("edgegen-tiny-llama")
    writer.add_file_type(LlamaFileType.ALL_F32)
    writer.add_vocab_size(len(tokens))
    writer.add_context_length(n_ctx_train)
    writer.add_embedding_length(n_embd)
    writer.add_block_count(n_layer)
    writer.add_feed_forward_length(n_ff)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_head_kv)
    # Required by llama.cpp's llama loader (no default for the RMS epsilon).
    writer.add_layer_norm_rms_eps(1e-5)
    # Rotate the whole head, as SmolLM2-135M does (base 10000).
    writer.add_rope_dimension_count(n_embd // n_head)
    writer.add_rope_freq_base(10000.0)

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(PRE_TOKENIZER)
    writer.add_token_list(list(tokens))
    writer.add_token_types(list(types))
    writer.add_token_merges(list(merges))
    writer.add_bos_token_id(BOS_ID)
    writer.add_eos_token_id(EOS_ID)
    writer.add_eot_token_id(EOT_ID)
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)
    writer.add_chat_template(CHATML_TEMPLATE)

    for name, tensor in tensors.items():
        writer.add_tensor(name, tensor)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
