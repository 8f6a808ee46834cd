"""Past one device, with the engines that already exist, at tiny sizes on CPU.

* **Tensor parallelism**: a model loaded with transformers' ``tp_plan="auto"`` under
  ``torchrun --nproc-per-node 2`` (gloo) and pressed on every rank gives the logits of the
  single-process pressed model; each rank's cache holds its own kv heads only, at most
  ``capacity`` entries per layer (the press trims what the attention module hands it, so
  sharded heads need nothing special). The ranks run ``tests/tp_stream.py``.
* **accelerate offload**: a pressed model loaded with a ``device_map`` that sends layers to
  disk (explicitly, or by ``device_map="auto"`` under a ``max_memory`` it cannot meet), or
  wrapped by ``accelerate.cpu_offload``, gives the logits of the same model loaded plainly.
  accelerate's hooks replace ``forward`` and move weights in and out around it; the press's
  hooks are PyTorch module hooks around ``__call__``, so the two stack.

Both compare a stream (the prompt in one call, then token by token, as ``loop_logits``) and
greedy ``generate()``, with evictions in both (capacity 16, 4 sinks).
"""

import os
import signal
import subprocess
import sys
from pathlib import Path

import accelerate  # noqa: F401  (device_map / tp_plan loading needs it: in the `test` extra)
import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

import kvpress_lite as kvl
from kvpress_lite.cache_access import cache_layers, model_cache_kwarg
from bounds import assert_float32_close
from tiny_models import tiny_config, tiny_model

N_SINK, CAPACITY = 4, 16
TOKENS, PROMPT = 60, 20  # stream: a 20-token prompt (over capacity: chunked), then 39 single tokens
GEN_PROMPT, GEN_NEW = 8, 30  # generate(): 8 + 30 tokens through a 16-entry cache
LAYERS, HEADS, KV_HEADS = 4, 4, 2  # kv heads divisible by the 2 ranks: one kv head per rank
TP_SCRIPT = Path(__file__).with_name("tp_stream.py")
TP_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny_llama")
    model = tiny_model("llama", num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, 128, (1, TOKENS), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def stream(model, ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """loop_logits, also returning the most entries any cache layer held after any call."""
    cache, name = DynamicCache(), model_cache_kwarg(model)
    longest = 0

    def step(tokens):
        nonlocal longest
        out = model(input_ids=tokens, use_cache=True, **{name: cache})
        longest = max([longest] + [layer.keys.shape[-2] for layer in cache_layers(cache)])
        return out.logits[0]

    logits = [step(ids[:, :PROMPT])]
    logits += [step(ids[:, t : t + 1]) for t in range(PROMPT, ids.shape[1] - 1)]
    return torch.cat(logits), longest


@torch.no_grad()
def generate(model, ids: torch.Tensor):
    """Greedy generate() from the first GEN_PROMPT ids: (sequences, logits, entries in its final cache)."""
    prompt = ids[:, :GEN_PROMPT]
    out = model.generate(
        prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=GEN_NEW, min_new_tokens=GEN_NEW,
        do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0,
    )
    longest = max(layer.keys.shape[-2] for layer in cache_layers(_generated_cache(out)))
    return out.sequences, torch.stack(out.logits)[:, 0], longest


def _generated_cache(out):
    """The cache generate() returned: `cache` on transformers 5.x (`past_key_values` warns there), else 4.x's name."""
    return out["cache"] if "cache" in out else out["past_key_values"]


def pressed_run(model, ids: torch.Tensor) -> dict:
    with kvl.apply_press(model, n_sink=N_SINK, capacity=CAPACITY):
        logits, longest = stream(model, ids)
        sequences, gen_logits, gen_longest = generate(model, ids)
    return dict(logits=logits, longest=longest, sequences=sequences, gen_logits=gen_logits, gen_longest=gen_longest)


@pytest.fixture(scope="module")
def single(model_dir, ids) -> dict:
    """The plainly loaded model, one process: the dense stream and the pressed runs."""
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    dense, _ = stream(model, ids)
    run = pressed_run(model, ids)
    assert run["longest"] == run["gen_longest"] == CAPACITY
    # the press acted: evictions changed the logits
    assert (run["logits"] - dense).abs().max() > 0.1
    return dict(run, dense=dense)


def assert_same_run(got: dict, want: dict) -> None:
    """Split over ranks (an all-reduce) or offloaded: the same sums in another order (tests/bounds.py)."""
    config = tiny_config("llama", num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS)
    kv = CAPACITY + PROMPT  # a prompt chunk attends to the cache and itself
    assert_float32_close(got["logits"], want["logits"], config, kv, runs=2)
    assert torch.equal(got["sequences"], want["sequences"])
    assert_float32_close(got["gen_logits"], want["gen_logits"], config, kv, runs=2)


# -- tensor parallelism -----------------------------------------------------------------------


def _torchrun(args: list, timeout: float) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if sys.platform.startswith("linux") and os.path.exists("/sys/class/net/lo"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # gloo otherwise resolves the host name, which may not resolve
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *map(str, args)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both ranks: the session it leads
        out, _ = proc.communicate()
        pytest.fail(f"torchrun did not finish within {timeout} s; output:\n{out[-4000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, None)


@pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                    reason="this torch build has no torch.distributed with the gloo backend")
def test_tensor_parallel_two_ranks_match_single_process(model_dir, ids, single, tmp_path):
    ids_file, out_file = tmp_path / "ids.pt", tmp_path / "rank0.pt"
    torch.save(ids, ids_file)
    run = _torchrun([TP_SCRIPT, model_dir, ids_file, out_file, N_SINK, CAPACITY, PROMPT, GEN_PROMPT, GEN_NEW],
                    TP_TIMEOUT_S)
    assert run.returncode == 0, f"torchrun failed (rc {run.returncode}):\n{run.stdout[-6000:]}"
    got = torch.load(out_file)
    assert got["backend"] == "gloo" and got["world"] == 2
    assert got["ranks_agree"], "the two ranks returned different logits"
    # every call: one kv head of two on this rank, at most CAPACITY entries (checked on every layer in the script)
    assert {shape[1] for shape in got["shapes"]} == {KV_HEADS // 2}
    assert max(shape[2] for shape in got["shapes"]) == CAPACITY
    assert got["evicted"] == TOKENS - 1 - CAPACITY
    assert_same_run(dict(got, gen_logits=got["generate_logits"]), single)


# -- accelerate offload ------------------------------------------------------------------------


def _model_bytes(model_dir: Path) -> int:
    return sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))


def _load_offloaded(kind: str, model_dir: Path, offload_dir: Path):
    if kind == "device_map":  # explicit: two layers (and the head) on disk, the rest resident
        device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu",
                      **{f"model.layers.{i}": "cpu" if i < LAYERS // 2 else "disk" for i in range(LAYERS)},
                      "lm_head": "disk"}
        model = AutoModelForCausalLM.from_pretrained(model_dir, device_map=device_map, offload_folder=offload_dir)
        assert model.hf_device_map == device_map
    elif kind == "auto":  # room for ~60 % of the weights: accelerate sends the rest to disk
        max_memory = {"cpu": int(0.6 * _model_bytes(model_dir))}
        model = AutoModelForCausalLM.from_pretrained(model_dir, device_map="auto", max_memory=max_memory,
                                                     offload_folder=offload_dir)
        placed = set(model.hf_device_map.values())
        assert placed == {"cpu", "disk"}, f"expected a split between cpu and disk, got {model.hf_device_map}"
    else:  # accelerate.cpu_offload: the weights live in a CPU-side map, loaded into the modules per forward
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        model = accelerate.cpu_offload(model, execution_device=torch.device("cpu"))
    layer = model.model.layers[LAYERS - 1].self_attn.q_proj
    assert layer.weight.device.type == "meta", "the last layer's weights should be offloaded (on meta until used)"
    return model.eval()


# transformers 4.56 reads the device of a cpu_offload-ed model off its first parameter (meta) and warns
@pytest.mark.filterwarnings("ignore:You are calling .generate.. with the `input_ids` being on a device type different")
@pytest.mark.parametrize("kind", ["device_map", "auto", "cpu_offload"])
def test_offloaded_model_matches_plain_load(kind, model_dir, ids, single, tmp_path):
    model = _load_offloaded(kind, model_dir, tmp_path / "offload")
    got = pressed_run(model, ids)
    assert got["longest"] == got["gen_longest"] == CAPACITY
    assert_same_run(got, single)
    # offload is still in place after the run (the press did not pull weights in for good)
    assert model.model.layers[LAYERS - 1].self_attn.q_proj.weight.device.type == "meta"
