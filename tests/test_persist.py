"""kvl.save_cache / kvl.load_cache: a pressed stream written to disk and read back continues
exactly as if it had stayed in memory, for every kind of position (full RoPE, partial RoPE,
learned absolute, sliding-window layers beside global ones)."""

from pathlib import Path

import pytest
import torch

import kvpress_lite as kvl
from kvpress_lite.cache_access import model_cache_kwarg, new_dynamic_cache
from kvpress_lite.persist import CacheFileError
from kvpress_lite.tiny import tiny_model

FAMILIES = {"llama": 2, "gpt_neox": 2, "gpt2": 2, "gemma3_text": 6}  # gemma3: five sliding layers, one global


def stream(model, cache, ids):
    kw = model_cache_kwarg(model)
    with torch.no_grad():
        model(input_ids=ids[:, :30], use_cache=True, **{kw: cache})  # a prompt past the capacity
        for i in range(30, ids.shape[1]):  # then one token a call
            model(input_ids=ids[:, i : i + 1], use_cache=True, **{kw: cache})


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_saved_stream_continues_exactly(family, tmp_path):
    model = tiny_model(family, num_layers=FAMILIES[family])
    ids = torch.randint(0, 100, (1, 70), generator=torch.Generator().manual_seed(1))
    kw = model_cache_kwarg(model)
    with kvl.apply_press(model, n_sink=4, capacity=16) as press:
        cache = new_dynamic_cache(model)
        stream(model, cache, ids[:, :45])
        path = kvl.save_cache(cache, tmp_path / "s.safetensors", extra={"turn": 3})
        restored, extra = kvl.load_cache(path, model)
        assert extra == {"turn": 3} and list(tmp_path.iterdir()) == [path]  # no temporary file left behind
        with torch.no_grad():
            want = [model(input_ids=ids[:, i : i + 1], use_cache=True, **{kw: cache}).logits for i in range(45, 70)]
            got = [model(input_ids=ids[:, i : i + 1], use_cache=True, **{kw: restored}).logits for i in range(45, 70)]
        assert press.stats.evicted_tokens > 0
    torch.testing.assert_close(torch.cat(got), torch.cat(want), atol=0, rtol=0)


def test_a_file_for_another_model_or_no_cache_file_is_refused(tmp_path):
    llama, gemma = tiny_model("llama"), tiny_model("gemma3_text", num_layers=6)
    with kvl.apply_press(llama, n_sink=4, capacity=16):
        cache = new_dynamic_cache(llama)
        stream(llama, cache, torch.randint(0, 100, (1, 40)))
        path = kvl.save_cache(cache, tmp_path / "llama.safetensors")
    with pytest.raises(CacheFileError, match="written for another model"):
        kvl.load_cache(path, gemma)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(CacheFileError, match="not a kvpress-lite cache file"):
        kvl.load_cache(junk, llama)


def test_a_failed_write_leaves_the_previous_file(tmp_path, monkeypatch):
    import safetensors.torch

    model = tiny_model("llama")
    with kvl.apply_press(model, n_sink=4, capacity=16):
        cache = new_dynamic_cache(model)
        stream(model, cache, torch.randint(0, 100, (1, 40)))
        path = kvl.save_cache(cache, tmp_path / "s.safetensors", extra={"turn": 1})
        before = path.read_bytes()

        def crash(tensors, filename, metadata=None):
            Path(filename).write_bytes(b"half")
            raise KeyboardInterrupt

        monkeypatch.setattr(safetensors.torch, "save_file", crash)
        with pytest.raises(KeyboardInterrupt):
            kvl.save_cache(cache, path, extra={"turn": 2})
    assert path.read_bytes() == before and list(tmp_path.iterdir()) == [path]
