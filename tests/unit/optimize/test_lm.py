"""The lm task's pieces on a tiny random llama: requantization, depth pruning, perplexity, decode speed."""

from __future__ import annotations

import math
from pathlib import Path

import llama_cpp
import numpy as np
import pytest
from gguf import GGUFReader

from edgegen.errors import ConfigError, ExecutorError
from edgegen.optimize import lm
from edgegen.store.gguf import describe, read_gguf
from tests.llm_models import write_tiny_llama

N_LAYER = 4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("lm") / "tiny.gguf", n_layer=N_LAYER)


@pytest.fixture(scope="module")
def tokens(tiny: Path) -> list[int]:
    with lm.Scorer(tiny, 64, 2) as scorer:
        return scorer.tokenize(lm.heldout_text())


def test_the_heldout_text_is_fixed_and_long(tokens: list[int]) -> None:
    text = lm.heldout_text()
    assert text == lm.heldout_text()
    assert len(text) > 50_000
    assert "Return" in text  # docstrings, not source
    assert len(tokens) > 10_000


def test_a_missing_module_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="no_such_module"):
        lm.heldout_text(("json", "no_such_module"))


@pytest.mark.parametrize(
    ("type_name", "bytes_per_weight"), [("F16", 2.0), ("Q8_0", 34 / 32), ("Q4_0", 18 / 32)]
)
def test_quantize_writes_the_type_asked_for(
    tiny: Path, tmp_path: Path, type_name: str, bytes_per_weight: float
) -> None:
    out = tmp_path / "q.gguf"
    lm.quantize_gguf(tiny, out, type_name, threads=2)
    info = read_gguf(out)
    matrices = [t for t in info.tensors if t.name.endswith(("attn_q.weight", "ffn_up.weight"))]
    assert len(matrices) == 2 * N_LAYER
    for tensor in matrices:
        assert tensor.type_name == type_name
        assert tensor.nbytes == tensor.n_elements * bytes_per_weight
    assert describe(out)[2]["parameter_count"] == describe(tiny)[2]["parameter_count"]


def test_a_failed_quantization_raises(tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + bytes(60))
    with pytest.raises(ExecutorError, match="could not quantize"):
        lm.quantize_gguf(bad, tmp_path / "out.gguf", "Q8_0", threads=1)


def test_dropping_blocks_renumbers_the_rest_and_keeps_their_weights(tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "cut.gguf"
    assert lm.drop_layers(tiny, out, [1, 2]) == N_LAYER - 2
    facts = describe(out)[2]
    assert facts["block_count"] == N_LAYER - 2
    before = {t.name: t.data for t in GGUFReader(tiny).tensors}
    after = {t.name: t.data for t in GGUFReader(out).tensors}
    assert sorted({n.split(".")[1] for n in after if n.startswith("blk.")}) == ["0", "1"]
    for name, data in after.items():
        # new block 1 is old block 3; everything outside the blocks is unchanged
        source = name.replace("blk.1.", "blk.3.") if name.startswith("blk.1.") else name
        np.testing.assert_array_equal(data, before[source])
    per_block = len([n for n in before if n.startswith("blk.0.")])
    assert len(after) == len(before) - 2 * per_block
    with lm.Scorer(out, 64, 2) as scorer:  # llama.cpp loads and runs it
        assert scorer.decode_ms(scorer.tokenize("def main"), 3, 1)


@pytest.mark.parametrize("drop", [[], [N_LAYER], [-1], list(range(N_LAYER))])
def test_impossible_cuts_are_refused(tiny: Path, tmp_path: Path, drop: list[int]) -> None:
    with pytest.raises(ConfigError, match="distinct indices"):
        lm.drop_layers(tiny, tmp_path / "cut.gguf", drop)
    assert not (tmp_path / "cut.gguf").exists()


def test_perplexity_is_what_llama_cpp_python_computes_independently(tiny: Path, tokens: list[int]) -> None:
    ctx, chunks = 64, 3
    with lm.Scorer(tiny, ctx, 2) as scorer:
        ours = scorer.perplexity(tokens, chunks)
    # The same definition through the high-level API: every position's logits, one chunk at a time.
    reference = llama_cpp.Llama(str(tiny), n_ctx=ctx, logits_all=True, n_threads=2, verbose=False)
    nll = []
    for c in range(chunks):
        chunk = tokens[c * ctx : (c + 1) * ctx]
        reference.reset()
        reference.eval(chunk)
        scores = np.asarray(reference.scores[:ctx], dtype=np.float64)
        for pos in range(ctx // 2, ctx):
            row = scores[pos - 1]
            nll.append(np.log(np.exp(row - row.max()).sum()) + row.max() - row[chunk[pos]])
    reference.close()
    assert ours == pytest.approx(math.exp(float(np.mean(nll))), rel=1e-4)
    assert 1 < ours < len(tokens)


def test_perplexity_needs_enough_text(tiny: Path) -> None:
    with lm.Scorer(tiny, 64, 2) as scorer, pytest.raises(ConfigError, match="too few"):
        scorer.perplexity(list(range(100)), 2)


def test_decode_speed_times_every_step(tiny: Path, tokens: list[int]) -> None:
    with lm.Scorer(tiny, 64, 2) as scorer:
        steps = scorer.decode_ms(tokens[:8], 5, 2)
    assert len(steps) == 10
    assert all(0 < ms < 10_000 for ms in steps)
