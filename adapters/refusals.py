"""Families the press refuses, and why: ``apply_press`` names the reason before anything runs.

Each group was found by the conformance survey (tests/conformance/survey.py) on tiny random
configs of transformers 5.24: no built-in position scheme makes these exact, or there is
nothing a sink+window cache can bound. A plugin that serves one of them takes precedence.
"""

import kvpress_lite as kvl

REFUSED = {
    "its layers keep an SSM / linear-attention / convolution state (alone or beside attention layers), which is "
    "not a KV cache a sink+window press can trim; pressing only the attention layers of a hybrid is not "
    "verified": (
        "bailing_hybrid", "bamba", "falcon_h1", "falcon_mamba", "granitemoehybrid", "jamba", "kimi_linear",
        "lara_mini", "lfm2", "lfm2_moe", "lfm3", "mamba", "mamba2", "minimax", "nemotron_h", "olmo_hybrid",
        "qwen3_5_moe_text", "qwen3_5_text", "qwen3_next", "qwen4_exp_text", "recurrent_gemma", "zamba", "zamba2",
    ),
    "multi-head latent attention: the cache holds compressed latents with the rotary part of the keys stored "
    "apart (in the value slot), which no position scheme here re-positions": (
        "axk1", "axk2", "deepseek_v2", "deepseek_v3", "deepseek_v32", "dots3_note_text", "glm4_moe_lite",
        "glm_moe_dsa", "hy_v4", "longcat_flash", "minicpm3", "sarvam_mla", "youtu",
    ),
    "compressed (sparse-indexed) attention: the cache is not a plain sequence of keys": ("deepseek_v4",),
    "a learned indexer picks which cached keys each query attends to (sparse attention), so the visible set is "
    "not sinks + window and an evicted key may be one it would pick": ("kolibri1_1",),
    "positions count from padding_idx + 1; the example plugin kvpress-lite-roberta (plugins/ in the kvpress-lite "
    "repository) serves this family": (
        "camembert", "data2vec-text", "roberta", "roberta-prelayernorm", "xlm-roberta", "xlm-roberta-xl", "xmod",
    ),
    "no attention KV cache (a recurrent state, or no transformers cache at all): nothing to press": (
        "openai-gpt", "reformer", "rwkv", "xlm", "xlnet", "xlstm",
    ),
    "keys pass a causal convolution over neighbouring tokens, so a kept key depends on evicted ones": (
        "inkling2_loop_text", "inkling2_text", "inkling_text", "zaya",
    ),
    "RoPE on its sliding layers and none on its global ones: the per-layer-type scheme built for it (NoPE where "
    "config.rope_parameters has no entry) failed the positions-within-cache check on transformers 5.25 (relative "
    "error 0.043), so it is refused until the cause is found": ("ergo",),
    "layers run several times per token on one shared cache (looped / hierarchical recurrence)": ("dory", "hrm_text"),
    "a normalisation with a learned gain is applied to keys after RoPE, so rotating a cached key is no longer a "
    "position shift": ("hunyuan_v1_dense", "hunyuan_v1_moe"),
    "queries are scaled by a function of their absolute position (scalable softmax), which positions within "
    "the cache would change": ("beam",),
    "T5-style bucketed relative position bias, computed from absolute positions the press does not hand": ("cpmant",),
    "chunked-attention layers (attention_chunk_size) are not sliding windows, and the press has no exact treatment "
    "for them": ("llama4_text",),
    "its sinusoidal RoPE is built from the sequence length, not from position_ids the press could hand": ("roformer",),
    "the causal-LM wrapper calls the decoder directly and takes no position_ids": ("trocr",),
    "deprecated in transformers 4.x and removed in 5, so never surveyed: not verified": (
        "mega", "open-llama", "qdqbert", "speech_to_text_2", "transfo-xl", "xlm-prophetnet",
    ),
    "the decoder of an encoder-decoder model: kvpress-lite streams decoder-only causal LMs": (
        "bart", "bigbird_pegasus", "blenderbot", "blenderbot-small", "marian", "mbart", "musicgen",
        "musicgen_melody", "mvp", "pegasus", "plbart", "prophetnet", "whisper",
    ),
    "a multimodal or composite model, which the conformance suite cannot build as a stand-alone text decoder; "
    "the text-only variant of the family is served where there is one (gemma3_text, gemma4_text, ...)": (
        "blt", "dots3_note", "emu3", "fuyu", "gemma3", "gemma3n", "gemma4", "gemma4_unified",
        "gemma4_unified_assistant", "gemma4_assistant", "git", "got_ocr2", "llama4", "mllama", "moshi",
        "moss_transcribe_diarize", "phi4_multimodal", "qwen3_5", "qwen3_5_moe", "qwen4_exp",
    ),
}


@kvl.hookimpl
def kvpress_lite_register_adapters(register):
    for reason, model_types in REFUSED.items():
        register(kvl.Refusal(model_types=model_types, reason=reason))
