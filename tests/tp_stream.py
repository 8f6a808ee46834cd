"""Run under torchrun by tests/test_scale.py: stream tokens through a pressed model loaded
with transformers tensor parallelism (``tp_plan="auto"``), on CPU over gloo.

    torchrun --standalone --nproc-per-node 2 tests/tp_stream.py MODEL_DIR IDS_FILE OUT_FILE \
        N_SINK CAPACITY PROMPT_LEN GEN_PROMPT GEN_NEW

Each rank loads its shard of the model, applies the press and streams the ids of IDS_FILE
(the prompt in one call, then one token at a time, as ``helpers.loop_logits``); after every
call it checks that each of its cache layers holds at most CAPACITY entries and only its own
share of the key/value heads. Then it runs greedy ``generate()`` for GEN_NEW tokens from the
first GEN_PROMPT ids, on a new stream. Rank 0 writes the logits of both, the cache shapes it
saw and the process group's backend to OUT_FILE (torch.save).
"""

import inspect
import sys

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM, DynamicCache

import kvpress_lite as kvl
from kvpress_lite.cache_access import cache_layers, model_cache_kwarg


def tp_auto() -> dict:
    """``tp_plan="auto"`` as this transformers release takes it: through a DistributedConfig
    from 5.x on (the bare keyword is deprecated there), as a keyword on 4.x."""
    try:
        from transformers.distributed import DistributedConfig
    except ImportError:
        return {"tp_plan": "auto"}
    if "tp_plan" in inspect.signature(DistributedConfig).parameters:
        return {"distributed_config": DistributedConfig(tp_plan="auto")}
    return {"tp_plan": "auto"}


@torch.no_grad()
def main() -> None:
    model_dir, ids_file, out_file = sys.argv[1:4]
    n_sink, capacity, prompt_len, gen_prompt, gen_new = (int(a) for a in sys.argv[4:9])
    torch.set_num_threads(1)
    # Set up the process group ourselves, on gloo (the CPU backend); from_pretrained would do
    # the same from torchrun's RANK / WORLD_SIZE, and uses an existing group as it is.
    dist.init_process_group(backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()

    model = AutoModelForCausalLM.from_pretrained(model_dir, **tp_auto())  # default attention (sdpa)
    model.eval()
    config = model.config
    local_kv_heads = config.num_key_value_heads // world
    head_dim = config.hidden_size // config.num_attention_heads
    k_proj = model.model.layers[0].self_attn.k_proj
    weight = k_proj.weight.to_local() if hasattr(k_proj.weight, "to_local") else k_proj.weight
    assert weight.shape[0] == local_kv_heads * head_dim, f"k_proj not sharded: {tuple(weight.shape)}"

    ids = torch.load(ids_file)
    press = kvl.apply_press(model, n_sink=n_sink, capacity=capacity)
    cache = DynamicCache()
    name = model_cache_kwarg(model)
    shapes = []

    def step(tokens: torch.Tensor) -> torch.Tensor:
        out = model(input_ids=tokens, use_cache=True, **{name: cache})
        layers = cache_layers(cache)
        assert len(layers) == config.num_hidden_layers
        for layer in layers:
            keys, values = layer.keys, layer.values
            assert not hasattr(keys, "to_local"), "the cache holds DTensors, expected local shards"
            assert keys.shape[1] == values.shape[1] == local_kv_heads, f"rank {rank}: {tuple(keys.shape)}"
            assert keys.shape[2] <= capacity, f"rank {rank}: {keys.shape[2]} entries > capacity {capacity}"
        shapes.append(tuple(layers[0].keys.shape))
        logits = out.logits
        return logits.to_local() if hasattr(logits, "to_local") else logits

    logits = [step(ids[:, :prompt_len])[0]]
    for t in range(prompt_len, ids.shape[1] - 1):
        logits.append(step(ids[:, t : t + 1])[0])
    logits = torch.cat(logits)
    assert logits.shape[-1] == config.vocab_size, f"logits not gathered: {tuple(logits.shape)}"
    stats = press.stats
    compressions, evicted = stats.compressions, stats.evicted_tokens

    # generate() on a new stream: greedy, GEN_NEW tokens from the first GEN_PROMPT ids
    prompt = ids[:, :gen_prompt]
    out = model.generate(
        prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=gen_new, min_new_tokens=gen_new,
        do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0,
    )
    gen_logits = torch.stack([g.to_local() if hasattr(g, "to_local") else g for g in out.logits])[:, 0]
    for layer in cache_layers(out["cache"] if "cache" in out else out["past_key_values"]):
        assert layer.keys.shape[1] == local_kv_heads and layer.keys.shape[2] <= capacity, tuple(layer.keys.shape)
    press.remove()

    gathered = [torch.empty_like(logits) for _ in range(world)]
    dist.all_gather(gathered, logits.contiguous())  # every rank must see the same logits
    if rank == 0:
        torch.save(
            {
                "logits": logits,
                "ranks_agree": all(torch.equal(g, logits) for g in gathered),
                "shapes": shapes,
                "backend": dist.get_backend(),
                "world": world,
                "compressions": compressions,
                "evicted": evicted,
                "sequences": out.sequences,
                "generate_logits": gen_logits,
            },
            out_file,
        )
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
