"""`kvpress-lite longrun`: the long-stream run's wiring on a tiny random Llama (the 100k-token
run itself is a benchmark; its results are in benchmarks/results/longrun)."""

import math

import pytest
import torch
import torch.nn.functional as F
import transformers

import kvpress_lite as kvl
from bounds import float32_bound
from kvpress_lite.cache_access import model_cache_kwarg
from kvpress_lite_harness.longrun import block_table, markdown, plot, run_longrun
from tiny_models import tiny_model

N_SINK, CAPACITY, BLOCK, TOKENS = 4, 32, 40, 150


def eager_press_nll(model, ids):
    """The same stream through the hook press and a DynamicCache (another code path than StreamingCache)."""
    from transformers import DynamicCache

    kw, cache, out = model_cache_kwarg(model), DynamicCache(), []
    with kvl.apply_press(model, n_sink=N_SINK, capacity=CAPACITY), torch.no_grad():
        for i in range(ids.numel() - 1):
            logits = model(input_ids=ids[None, i : i + 1], use_cache=True, **{kw: cache}).logits[0, -1:]
            out.append(float(F.cross_entropy(logits, ids[i + 1 : i + 2])))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("head_batch", [1, 7])  # the causal LM's call every token; the decoder + a batched head
def test_long_run_scores_every_token_keeps_memory_fixed_and_reports_blocks(tmp_path, head_batch):
    model = tiny_model("llama")
    ids = torch.randint(0, model.config.vocab_size, (TOKENS + 1,), generator=torch.Generator().manual_seed(0))
    partial = tmp_path / "run.partial.json"
    if int(transformers.__version__.split(".")[0]) < 5:  # StreamingCache needs transformers 5: said, not crashed
        with pytest.raises(kvl.UnsupportedModelError, match="needs transformers >= 5"):
            run_longrun(model, ids, n_sink=N_SINK, capacity=CAPACITY, block=BLOCK, dense_tokens=0,
                        head_batch=head_batch)
        return
    res = run_longrun(model, ids, n_sink=N_SINK, capacity=CAPACITY, block=BLOCK, dense_tokens=80, dense_chunk=16,
                      compile=True, partial=partial, metadata={"model": "tiny", "text": "random"},
                      head_batch=head_batch, fresh=head_batch > 1)
    s = res["summary"]
    assert s["recompiles"] == 0 and not partial.exists()
    assert [r["tokens"] for r in s["blocks"]] == [40, 40, 40, 30]
    # the blocks' perplexities are those of an independent per-token NLL: the eager press, within the float bound
    # (an NLL moves by at most twice the largest logit error)
    want = eager_press_nll(model, ids)
    bound = 2 * float32_bound(model.config, CAPACITY + 1, runs=2)
    for row in s["blocks"]:
        part = want[row["start"] : row["start"] + row["tokens"]]
        assert abs(math.log(row["ppl"]) - float(part.mean())) <= bound
    # constant memory: the static cache holds the same bytes after every block; dense grows with the stream
    assert len({r["press_cache_bytes"] for r in s["blocks"]}) == 1
    dense = [r["dense_cache_bytes"] for r in s["blocks"] if "dense_cache_bytes" in r]
    assert len(dense) == 2 and dense[1] == 2 * dense[0]
    later = sorted(r["ppl"] for r in s["blocks"][1:3])
    assert s["blocks_after_first"] == 2 and math.isclose(s["median_block_ppl"], sum(later) / 2)  # full blocks only
    if head_batch > 1:  # the text's own difficulty: one dense forward over each block alone, no cache
        for row in s["blocks"]:
            lo, hi = row["start"], min(row["start"] + BLOCK, TOKENS)
            with torch.no_grad():
                logits = model(input_ids=ids[None, lo:hi], use_cache=False).logits[0]
            want = math.exp(float(F.cross_entropy(logits, ids[lo + 1 : hi + 1])))
            assert abs(math.log(row["fresh_ppl"] / want)) <= 2 * float32_bound(model.config, BLOCK, runs=2)
        assert s["ratios"] == 3 and "fresh-block ppl" in markdown(res)
    text = markdown(res)
    assert "| 0-40 |" in text and "0 recompiles" in text
    plot(res, tmp_path / "long.png")
    assert (tmp_path / "long.png").stat().st_size > 10_000


def test_block_table_leaves_unscored_tokens_out():
    nll = torch.tensor([1.0, math.nan, 1.0, 3.0, 3.0], dtype=torch.float64)
    rows = block_table(nll, 3)
    assert [r["tokens"] for r in rows] == [2, 2] and math.isclose(rows[0]["ppl"], math.e)
