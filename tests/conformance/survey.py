"""Survey: for every causal-LM type of the installed transformers, which adapter makes it exact?

    OMP_NUM_THREADS=1 python tests/conformance/survey.py [model_type ...] [--out /tmp/family_survey]

For each type that builds tiny (kvpress_lite/tiny.py), candidate adapters are generated from the
model's module tree (attention modules that take a cache keyword, rotary modules with
``inv_freq`` on the base model in rotate-half and interleaved layout, learned position tables,
or no positions at all for ALiBi / NoPE families) and tried with the checks of oracle.py under
eager attention; the first candidate passing all of (a)-(e) is re-checked under sdpa where the
family supports it. Writes ``<out>.json`` and ``<out>.md``.
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import os
import signal
import sys
import time
import traceback
import warnings

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import kvpress_lite as kvl  # noqa: E402
import kvpress_lite_adapters._rope_extra as extra  # noqa: E402
from oracle import NARROW_WINDOW, WIDE_WINDOW, CheckFailed, loop, run_checks, stream_ids  # noqa: E402
from kvpress_lite.tiny import NotBuildable, all_model_types, layer_variants, tiny_config, tiny_model, optional_window, two_layer_pattern, windowed_variant  # noqa: E402

CACHE_KWARGS = ("cache", "past_key_values", "past_key_value", "layer_past")
POSITION_TABLE_NAMES = ("wpe", "embed_positions", "position_embeddings", "pos_emb", "embed_pos", "position_embedding")
PER_TYPE_SECONDS = 240


class Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise Timeout("survey of this type ran out of time")


def base_of(model):
    return getattr(model, "base_model", model)


def takes_cache(module: nn.Module) -> bool:
    try:
        params = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False
    return any(k in params for k in CACHE_KWARGS)


def attention_paths(model, num_layers: int) -> list[str]:
    """Dotted paths from the base model to per-layer modules whose forward takes a cache keyword."""
    base = base_of(model)
    found = []
    for name, mod in base.named_modules():
        if not name or not isinstance(mod, nn.ModuleList) or len(mod) != num_layers or name.count(".") > 1:
            continue
        for layer in mod:  # every layer: hybrids keep attention in some layers only
            for sub_name, sub in layer.named_modules():
                if sub_name.count(".") > 2 or not takes_cache(sub):
                    continue
                path = f"{name}.*.{sub_name}" if sub_name else f"{name}.*"
                if path not in found:
                    found.append(path)
    attn = [p for p in found if not p.endswith("*")]
    # attention modules first (outermost first), whole layers last
    attn.sort(key=lambda p: (not any(w in p.rsplit(".", 1)[-1] for w in ("attn", "attention")), p.count(".")))
    return attn + [p for p in found if p.endswith("*")]


def rotary_attrs(model) -> list[str]:
    base = base_of(model)
    return [n for n, m in base.named_children() if isinstance(getattr(m, "inv_freq", None), torch.Tensor)]


def position_facts(model) -> dict:
    """What the model holds for positions, to pick candidate schemes and explain refusals."""
    base = base_of(model)
    facts = {"rotary_on_base": rotary_attrs(model), "inv_freq_elsewhere": [], "sincos_tables": [],
             "learned_tables": {}, "multiple_inv_freq_buffers": []}
    for name, buf in model.named_buffers():
        short = name.rsplit(".", 1)[-1]
        if "inv_freq" in short and short not in ("inv_freq", "original_inv_freq"):
            facts["multiple_inv_freq_buffers"].append(name)  # per-layer-type frequencies in one module
    base_prefix = ""
    for name, mod in model.named_modules():
        if mod is base:
            base_prefix = name
            break
    facts["base_prefix"] = base_prefix
    for name, mod in model.named_modules():
        inv = getattr(mod, "inv_freq", None)
        if isinstance(inv, torch.Tensor):
            rel = name[len(base_prefix) + 1:] if base_prefix and name.startswith(base_prefix + ".") else name
            if rel not in facts["rotary_on_base"]:
                facts["inv_freq_elsewhere"].append(name)
        for bname, buf in mod.named_buffers(recurse=False):
            if any(w in bname for w in ("sin", "cos", "embed_positions")) and buf.dim() == 2:
                facts["sincos_tables"].append(f"{name}.{bname}")
    for name, mod in base.named_children():
        if "sinusoid" in type(mod).__name__.lower():
            facts["sinusoidal_module"] = name
    for name, mod in base.named_modules():
        if isinstance(mod, nn.Embedding) and name.rsplit(".", 1)[-1] in POSITION_TABLE_NAMES:
            facts["learned_tables"][name] = mod.num_embeddings
    return facts


def max_positions_attrs(model, rows: int) -> list[str]:
    """Config attributes that could name the size of a position table of ``rows`` rows
    (OPT's table has 2 extra rows for its offset)."""
    out = []
    for attr in ("n_positions", "max_position_embeddings", "n_ctx", "max_target_positions"):
        value = getattr(model.config, attr, None)
        if isinstance(value, int) and rows - 2 <= value <= rows and attr not in out:
            out.append(attr)
    return out


def _factory(name):
    """A positions factory of kvpress_lite's public API, or None on a release without it."""
    return getattr(kvl, name, None)


def relative_positions():
    """No positions to move (ALiBi / NoPE): the library's factory, or a zero-dimension RoPE on
    releases that had only ``Rope``."""
    for name in ("no_positions",):
        if _factory(name) is not None:
            return _factory(name)()
    return lambda model: kvl.Rope(inv_freq=torch.zeros(0, dtype=torch.float64))


def position_schemes(model, facts) -> list[tuple[str, object, str]]:
    """(label, positions factory, oracle scheme) candidates, most specific first."""
    config = model.config
    schemes = []
    per_type = "per_layer_type" in inspect.signature(kvl.rope_positions).parameters
    starts = "rotary_start" in inspect.signature(kvl.rope_positions).parameters
    for attr in facts["rotary_on_base"]:
        for interleaved in (False, True):
            tag = ",interleaved" if interleaved else ""
            schemes.append((f"rope({attr}{tag})", kvl.rope_positions(attr, interleaved=interleaved), "rope"))
            nope = getattr(config, "qk_nope_head_dim", None)
            if starts and isinstance(nope, int) and nope:  # latent attention: the rotary slice ends the head
                schemes.append((f"rope({attr}{tag},start=qk_nope_head_dim)",
                                kvl.rope_positions(attr, interleaved=interleaved,
                                                   rotary_start=lambda c: c.qk_nope_head_dim), "rope"))
    for attr in facts["rotary_on_base"]:
        if getattr(config, "no_rope_layers", None):
            for interleaved in (False, True):
                tag = ",interleaved" if interleaved else ""
                schemes.append((f"rope({attr}{tag},nope_layers)",
                                extra.nope_layers_positions(attr, interleaved=interleaved), "rope"))
        schemes.append((f"rope({attr},reversed)", extra.reversed_rope_positions(attr), "rope"))
        kinds = sorted({t for t in (getattr(config, "layer_types", None) or []) if isinstance(t, str)})
        windowed_kinds = tuple(t for t in kinds if any(w in t for w in ("sliding", "local", "chunked")))
        if windowed_kinds and len(kinds) > 1:
            for interleaved in (False, True):
                tag = ",interleaved" if interleaved else ""
                schemes.append((f"rope({attr}{tag},only {'+'.join(windowed_kinds)})",
                                extra.layer_types_rope_positions(attr, windowed_kinds, interleaved=interleaved),
                                "rope"))
    for table in facts["sincos_tables"]:
        parts = table.split(".")
        base_prefix = facts.get("base_prefix", "")
        rel = parts[len(base_prefix.split(".")) if base_prefix else 0:]
        if len(rel) == 2:  # <child of the base model>.<table buffer>
            for interleaved in (True, False):
                tag = ",interleaved" if interleaved else ""
                schemes.append((f"sincos_table({rel[0]}.{rel[1]}{tag})",
                                extra.sincos_table_positions(rel[0], rel[1], interleaved=interleaved), "rope"))
    if per_type:
        for name in {b.split(".")[-2] if "." in b else "" for b in facts["multiple_inv_freq_buffers"]}:
            attr = name
            if attr and attr in dict(base_of(model).named_children()):
                for interleaved in (False, True):
                    tag = ",interleaved" if interleaved else ""
                    schemes.append((f"rope({attr}{tag},per_layer_type)",
                                    kvl.rope_positions(attr, interleaved=interleaved, per_layer_type=True), "rope"))
    no_rope = not facts["rotary_on_base"] and not facts["inv_freq_elsewhere"] and not facts["sincos_tables"] \
        and not facts["multiple_inv_freq_buffers"]
    if no_rope:
        for table, rows in facts["learned_tables"].items():
            for attr in max_positions_attrs(model, rows):
                schemes.append((f"learned({attr})", kvl.learned_positions(attr), "learned"))
        if not facts["learned_tables"]:
            if _factory("sinusoidal_positions"):
                schemes.append(("sinusoidal", _factory("sinusoidal_positions")(), "learned"))
            if _factory("alibi_positions"):
                schemes.append(("alibi", _factory("alibi_positions")(), "rope"))
            schemes.append(("none", relative_positions(), "rope"))
    if not no_rope:  # NoPE on the pressed layers, RoPE only on windowed ones (Cohere 2)
        schemes.append(("none", relative_positions(), "rope"))
    return schemes


def candidates(model_type: str, model) -> tuple[list, dict]:
    paths = attention_paths(model, 2)
    facts = position_facts(model)
    facts["attention_paths"] = paths
    # where the causal-LM wrapper calls a child of the base model (OPT: model.decoder), the press's
    # call hooks must go there (Adapter.decoder_path, on releases that have it)
    decoders = [None]
    if "decoder_path" in getattr(kvl.Adapter, "__dataclass_fields__", {}):
        decoders += sorted({p.split(".")[0] for p in paths if len(p.split(".")) > 2 and p.split(".")[1] != "*"})
    out = []
    for decoder in decoders:
        for path in paths:
            if decoder is not None and not path.startswith(decoder + "."):
                continue
            for label, positions, scheme in position_schemes(model, facts):
                extra_kwargs = {} if decoder is None else {"decoder_path": decoder}
                tag = path if decoder is None else f"{path} (calls at {decoder})"
                adapter = kvl.Adapter(name=f"{model_type}|{tag}|{label}", model_types=(model_type,),
                                      attention_path=path, positions=positions, description=label, **extra_kwargs)
                out.append((adapter, scheme, tag, label))
    return out, facts


def survey_type(model_type: str) -> dict:
    rec = {"type": model_type, "built": False}
    t0 = time.time()
    pattern = two_layer_pattern(model_type)
    try:
        try:
            config = tiny_config(model_type, 2, pattern)
            model = tiny_model(model_type, 2, "eager", config=config)
        except Exception:
            if pattern is None:
                raise
            pattern = None  # a mixed 2-layer pattern the family cannot build (hybrids): its default start
            config = tiny_config(model_type, 2, pattern)
            model = tiny_model(model_type, 2, "eager", config=config)
    except NotBuildable as exc:
        rec.update(status="not built", category=exc.category, detail=exc.detail[:300])
        return rec
    except Exception as exc:
        rec.update(status="not built", category="build error", detail=repr(exc)[:300])
        return rec
    rec["built"] = True
    rec["class"] = type(model).__name__
    rec["facts_config"] = {k: True for k in ("kv_lora_rank", "index_n_heads", "index_topk", "indexer_n_heads")
                           if getattr(config, k, None) is not None}
    rec["indexer"] = any(k.startswith("index") for k in rec["facts_config"])
    rec["config_keys"] = list(rec["facts_config"])
    rec["roberta_offset"] = getattr(config, "pad_token_id", None) is not None and model_type in (
        "camembert", "data2vec-text", "roberta", "roberta-prelayernorm", "xlm-roberta", "xlm-roberta-xl", "xmod")
    rec["variants"] = variants = layer_variants(model_type)
    windowed = tuple(v for v in variants if windowed_variant(model_type, v))
    cands, facts = candidates(model_type, model)
    rec["facts"] = {k: v for k, v in facts.items() if v}
    models: dict = {}

    def builder(window, sliding=False):
        def build(num_layers, attn, variant):
            key = (num_layers, attn, variant, window, sliding)
            if key not in models:
                layer = pattern if (num_layers == 2 and variant is None) else variant
                models[key] = tiny_model(model_type, num_layers, attn, layer=layer, window=window, sliding=sliding)
            return models[key]
        return build

    build = builder(WIDE_WINDOW if windowed and set(windowed) == set(variants) else NARROW_WINDOW)
    # does a plain stream run at all? (hybrid / no-cache families fail here, with no press involved)
    try:
        loop(build(2, "eager", None), stream_ids())
    except Exception as exc:
        rec.update(status="refused", category="no plain stream", detail=repr(exc)[:300])
        return rec
    try:
        sdpa_ok = True
        build(2, "sdpa", None)
    except Exception:
        sdpa_ok = False
    rec["sdpa"] = sdpa_ok
    # windowed families: once with windows the layers keep themselves, once with windows wider
    # than the capacity (the press trims those layers too)
    # (families whose every layer is windowed: only the wide one, narrow windows leave nothing to press;
    # families where a window is optional (Mistral): also with every layer windowed, wide)
    regimes = [("narrow", NARROW_WINDOW, windowed, False)] + ([("wide", WIDE_WINDOW, (), False)] if windowed else [])
    if windowed and set(windowed) == set(variants):
        regimes = regimes[1:]
    if optional_window(model_type):
        regimes.append(("wide-all", WIDE_WINDOW, (), True))
    rec["regimes"] = [r[0] for r in regimes]
    attns = ["eager"] + (["sdpa"] if sdpa_ok else [])
    tried = []
    for adapter, scheme, path, label in cands:
        entry = {"path": path, "positions": label}
        try:
            for regime, window, skip, sliding in regimes:
                for attn in attns:
                    key = attn if regime == "narrow" else f"{attn} {regime}"
                    try:
                        entry[key] = run_checks(builder(window, sliding), adapter, scheme, attn, tuple(variants),
                                                skip)
                    except CheckFailed as exc:
                        raise CheckFailed(exc.check if key == "eager" else f"{key} {exc.check}", exc.message)
                    except Exception as exc:
                        raise CheckFailed("error" if key == "eager" else f"{key} error",
                                          f"{type(exc).__name__}: {exc}")
        except CheckFailed as exc:
            entry.update(failed=exc.check, message=exc.message[:300])
            tried.append(entry)
            continue
        tried.append(entry)
        rec.update(status="accepted", path=path, positions=label, scheme=scheme)
        break
    else:
        rec.update(status="refused")
    rec["tried"] = tried
    rec["seconds"] = round(time.time() - t0, 1)
    return rec


# What reading the modeling code showed for families whose failure alone does not say why.
KNOWN_REASONS = {
    "hunyuan_v1_dense": ("norm after RoPE", "per-head RMSNorm with a learned gain applied to keys AFTER RoPE: a "
                         "rotation of the cached keys is no longer a position shift"),
    "hunyuan_v1_moe": ("norm after RoPE", "per-head RMSNorm with a learned gain applied to keys AFTER RoPE"),
    "zaya": ("convolution on keys", "queries/keys pass a causal convolution over neighbouring tokens, and values "
             "a recurrent state: a key depends on the tokens before it"),
    "inkling_text": ("convolution on keys", "short convolutions on k/v (sconv): a key depends on the tokens before it"),
    "inkling2_text": ("convolution on keys", "short convolutions on k/v (sconv): a key depends on the tokens before it"),
    "inkling2_loop_text": ("convolution on keys", "short convolutions on k/v and looped layers"),
    "beam": ("position-dependent query scale", "NoPE layers scale queries by (1 + position/2048)^0.1 (scalable "
             "softmax) from the absolute position; RoPE frequencies kept per layer type only for sliding layers"),
    "dory": ("looped layers", "layers run several loops sharing one KV state (shared_kv_states)"),
    "hrm_text": ("looped layers", "hierarchical recurrent layers write the cache several times per token"),
    "falcon_h1": ("hybrid SSM / linear attention", "attention and Mamba mixers run in parallel in every layer (SSM state in the cache)"),
    "llama4_text": ("chunked attention", "chunked-attention layers (attention_chunk_size, left to transformers by "
                    "the press) disagree with an exact teacher-forced reference (check f); also NoPE layers with "
                    "position-dependent temperature tuning, rotary module not a child of the base model"),
    "cpmant": ("relative position bias", "T5-style bucketed relative position bias; the plain stream already fails"),
    "roformer": ("sinusoidal RoPE without position_ids", "RoFormer builds its sinusoidal RoPE from the sequence "
                 "length (no position_ids): positions cannot be handed to it"),
    "xlstm": ("no KV cache", "xLSTM: recurrent matrix memory, no attention KV cache"),
    "zamba2": ("hybrid SSM / linear attention", "Mamba2 layers with a shared attention block"),
    "zamba": ("hybrid SSM / linear attention", "Mamba layers with a shared attention block"),
    "deepseek_v4": ("compressed attention", "compressor/indexer attention with its own rotary modules per branch"),
}


def categorise(rec: dict) -> tuple[str, str]:
    """(category, explanation) for a type that is not accepted."""
    if rec.get("status") == "not built":
        return rec.get("category", "not built"), rec.get("detail", "")
    mt = rec["type"]
    if mt in KNOWN_REASONS:
        return KNOWN_REASONS[mt]
    detail = rec.get("detail", "")
    tried = rec.get("tried") or []
    messages = " | ".join(t.get("message", "") for t in tried) + " " + detail
    facts = rec.get("facts", {})
    if "takes none of ('cache'" in messages or "no KV cache" in messages:
        return "no KV cache", "the model takes no transformers cache (recurrent state or none)"
    if "LinearAttention" in messages or "linear" in messages.lower() and "attention layers" in messages:
        return "hybrid SSM / linear attention", "cache layers that are not KV caches (SSM / conv / linear attention)"
    if rec.get("category") == "no plain stream":
        return "plain stream fails", detail
    if facts.get("mla") or "kv_lora_rank" in json.dumps(rec.get("config_keys", [])):
        return "multi-head latent attention", ("the cache holds compressed latents; the rotary part is cached in the "
                                               "value slot, which no position scheme rotates")
    if any("cache lengths [22" in t.get("message", "") for t in tried):
        return "press bypassed", ("the causal-LM wrapper calls a sub-module of the base model directly "
                                  "(e.g. self.model.decoder), so the press's base-model hooks never run")
    if rec.get("indexer"):
        return "sparse indexed attention", "an indexer keeps its own key cache next to the attention's"
    if any(t.get("positions") == "alibi" for t in tried):
        return "ALiBi", "; ".join(f"{t['positions']}: ({t.get('failed')}) {t.get('message', '')[:120]}"
                                  for t in tried if t.get("positions") == "alibi")[:400]
    if rec.get("roberta_offset") or any(t.get("failed") == "a" for t in tried) and facts.get("learned_tables"):
        return "learned positions with offset", ("positions are derived from the padding id (padding_idx + 1 "
                                                 "onwards); the position_ids the press hands are read differently")
    if "sliding window" in messages:
        return "sliding-window layers", detail or messages[:300]
    if "RoPE type" in messages:
        return "RoPE type refused by the library", messages[messages.index("RoPE type"):][:250]
    if "inv_freq" in messages or "rotary" in messages:
        return "rotary module not found", messages[:300]
    if tried and all(t.get("failed") in ("d", "e", "sdpa d", "sdpa e") for t in tried):
        return "inexact under every candidate", "; ".join(
            f"{t['path']} {t['positions']}: ({t['failed']}) {t.get('message', '')[:80]}" for t in tried[:4])
    return "error", messages[:300]


def write_markdown(results: dict, path: str) -> None:
    import transformers

    counts: dict = {}
    lines = [f"# kvpress-lite family survey (transformers {transformers.__version__})", "",
             "Checks (oracle.py): (a) no-op, (b) bounded cache, (c) generate() = loop, (d) absolute positions, "
             "(e) positions within the cache; (d)/(e) against one dense forward of a one-layer model per layer kind.",
             "", "| type | built | status | adapter (attention path, positions) | reason / category |",
             "| --- | --- | --- | --- | --- |"]
    for mt in sorted(results):
        rec = results[mt]
        if rec.get("status") == "accepted":
            shape = f"`{rec['path']}`, {rec['positions']}"
            notes = []
            last = rec["tried"][-1]
            for attn in ("eager", "sdpa"):
                for check, err in (last.get(attn) or {}).items():
                    if isinstance(err, str) and attn == "eager":
                        notes.append(f"{check}: {err[:60]}")
            reason = "; ".join(sorted(set(notes))) + ("" if rec.get("sdpa") else " (eager only)")
            status = "accepted"
        else:
            category, reason = rec.get("reason_category"), rec.get("reason", "")
            shape, status = "", f"refused: {category}" if rec.get("built") else f"not built: {category}"
        counts[status.split(":")[0] + (": " + status.split(": ", 1)[1] if ": " in status else "")] = \
            counts.get(status, 0) + 1
        reason = str(reason).replace("|", "/").replace("\n", " ")[:300]
        lines.append(f"| {mt} | {'yes' if rec.get('built') else 'no'} | {status} | {shape} | {reason} |")
    lines[2:2] = ["", "Counts: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1])), ""]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("types", nargs="*")
    parser.add_argument("--out", default="/tmp/family_survey")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    torch.set_num_threads(1)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
    except Exception:
        pass
    types = args.types or all_model_types()
    results = {}
    signal.signal(signal.SIGALRM, _alarm)
    for mt in types:
        signal.alarm(PER_TYPE_SECONDS)
        try:
            rec = survey_type(mt)
        except Timeout as exc:
            rec = {"type": mt, "built": True, "status": "refused", "category": "timeout", "detail": str(exc)}
        except Exception as exc:
            rec = {"type": mt, "built": False, "status": "error", "detail": traceback.format_exc()[-500:]}
        finally:
            signal.alarm(0)
        if rec.get("status") != "accepted":
            rec["reason_category"], rec["reason"] = categorise(rec)
        results[mt] = rec
        line = rec.get("path", "") + " " + rec.get("positions", "")
        if rec["status"] != "accepted":
            first = (rec.get("tried") or [{}])[0]
            line = rec.get("category", "") + " " + first.get("failed", "") + " " + first.get("message", rec.get("detail", ""))[:150]
        print(f"{mt:28s} {rec['status']:10s} {line}", flush=True)
    with open(args.out + ".json", "w") as f:
        json.dump(results, f, indent=1, default=str)
    write_markdown(results, args.out + ".md")


if __name__ == "__main__":
    main()
