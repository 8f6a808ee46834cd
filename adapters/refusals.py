"""Families the press refuses, and why: ``apply_press`` names the reason before anything runs.

Each group was found by the conformance survey (tests/conformance/survey.py) on tiny random
configs of transformers 5.24: no built-in position scheme makes these exact, or there is
nothing a sink+window cache can bound. A plugin that serves one of them takes precedence.
"""

import kvpress_lite as kvl

REFUSED = {
    "a pure recurrent model (SSM / linear attention, no attention layer): nothing to press, it already runs at "
    "constant memory": ("falcon_mamba", "mamba", "mamba2"),
    "a hybrid (Griffin: RG-LRU recurrences and local attention) with a cache of its own, not transformers' "
    "DynamicCache; its local attention already keeps a fixed window": ("recurrent_gemma",),
    "a hybrid whose attention layers are indexed (layer type 'indexed_attention': a learned block indexer, "
    "Qwen4ExpTextQSAIndexer, picks the top-k key blocks each query sees), so the visible set is not sinks + window "
    "and an evicted block may be one it would pick": ("qwen4_exp_text",),
    "a hybrid whose attention layers sit in shared transformer blocks reused across depths (one module, several "
    "cache layers); the conformance suite cannot build a tiny model with an attention layer, so it is not verified": (
        "zamba", "zamba2",
    ),
    "a hybrid whose config refuses a model of attention layers alone, so the one-layer positions-within-cache "
    "reference cannot be built and the press is not verified on it": ("olmo_hybrid",),
    "a hybrid that keeps its linear-attention state in a cache class of its own (MiniMaxCache), not in "
    "DynamicCache's layers the press reads": ("minimax",),
    "a hybrid of linear-attention, sliding and full layers whose one-layer positions-within-cache check fails "
    "under rotate-half RoPE (tiny model, transformers 5.25: relative error 0.13), so it is refused until its "
    "position scheme is found": ("lara_mini",),
    "multi-head latent attention with a sparse indexer (DeepSeek Sparse Attention: a learned indexer picks the "
    "keys each query sees), so the visible set is not sinks + window; its tiny model also raises under the press "
    "(a size mismatch, 10 against 9 entries)": ("axk2", "deepseek_v32", "glm_moe_dsa", "hy_v4"),
    "latent attention whose tiny config does not build (its sliding-window head_dim validation fails), so the "
    "conformance suite cannot verify it": ("dots3_note_text",),
    "two latent attention modules per layer on one cache (LongCat-Flash's shortcut-connected layers): the one-layer "
    "absolute-position check fails (tiny model, transformers 5.25: relative error 0.29)": ("longcat_flash",),
    "compressed (sparse-indexed) attention: the cache is not a plain sequence of keys": ("deepseek_v4",),
    "a learned indexer picks which cached keys each query attends to (sparse attention), so the visible set is "
    "not sinks + window and an evicted key may be one it would pick": ("kolibri1_1",),
    "no attention KV cache (a recurrent state, or no transformers cache at all): nothing to press": (
        "openai-gpt", "reformer", "rwkv", "xlm", "xlnet", "xlstm",
    ),
    "keys pass a causal convolution over neighbouring tokens, so a kept key depends on evicted ones": (
        "inkling2_loop_text", "inkling2_text", "inkling_text", "zaya",
    ),
    "layers run several times per token on one shared cache (looped / hierarchical recurrence)": ("dory", "hrm_text"),
    "queries are scaled by a function of their absolute position (scalable softmax), which positions within "
    "the cache would change": ("beam",),
    "queries and keys both pass an RMSNorm with a learned gain after RoPE, so a score depends on the two absolute "
    "positions, not only on their distance (tiny model, transformers 5.25: 0.046 relative off positions within the "
    "cache with the gain undone before re-rotating the sinks); exactness would need every cached key re-rotated at "
    "every step": ("hunyuan_v1_dense", "hunyuan_v1_moe"),
    "T5-style bucketed relative position bias, computed from absolute positions the press does not hand": ("cpmant",),
    "its sinusoidal RoPE is built from the sequence length, not from position_ids the press could hand": ("roformer",),
    "the causal-LM wrapper calls the decoder directly and takes no position_ids": ("trocr",),
    "deprecated in transformers 4.x and removed in 5, so never surveyed: not verified": (
        "mega", "open-llama", "qdqbert", "speech_to_text_2", "transfo-xl", "xlm-prophetnet",
    ),
    "the decoder of an encoder-decoder model whose causal LM is not a plain token decoder: it is not verified "
    "(MusicGen's takes one row of tokens per audio codebook; ProphetNet's predicts n-gram streams beside the "
    "main one)": ("musicgen", "musicgen_melody", "prophetnet"),
    "a composite model the conformance suite does not build tiny (a byte-level patcher, an image-captioning or "
    "speech model whose decoder is the whole model, a draft model reading its target's KV): not verified": (
        "blt", "gemma4_unified_assistant", "gemma4_assistant", "git", "moshi", "phi4_multimodal",
    ),
    "an audio wrapper whose forward takes position_ids only through **kwargs, so the conformance suite's "
    "reference at given positions cannot be built and the press is not verified on it": ("moss_transcribe_diarize",),
    "a multimodal wrapper whose vision tower is a timm model (timm is not among the test dependencies), so the "
    "conformance suite cannot build it; its text model gemma3n_text is served": ("gemma3n",),
}


@kvl.hookimpl
def kvpress_lite_register_adapters(register):
    for reason, model_types in REFUSED.items():
        register(kvl.Refusal(model_types=model_types, reason=reason))
