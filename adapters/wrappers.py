"""Multimodal wrappers served through their text model (kvpress_lite.wrappers): the wrapper's
``get_decoder()`` is the text decoder, its ``config.get_text_config()`` the text config, and
the text family's adapter reads both. Each type here was proven by the conformance suite on a
tiny wrapper built from its sub-configs (kvpress_lite/tiny.py), against the same references
as its text model; tests/test_wrappers.py checks that a text stream through the wrapper
equals the stand-alone text model's with the same weights. Image / audio inputs are refused at the
call, except in the wrappers of ``MEDIA`` (their image tokens are ordinary cache entries).

The second group loads through AutoModelForCausalLM as the text model itself (transformers
swaps in the text config), so its support is the text model's: listed so that the registry
names it for the composite type too.
"""

import transformers

import kvpress_lite as kvl

V5 = int(transformers.__version__.split(".")[0]) >= 5

WRAPPERS = ("gemma3",) + (("gemma4", "gemma4_unified", "fuyu", "got_ocr2") if V5 else ())
# wrappers whose image tokens enter the language model as ordinary causal entries (no bidirectional
# block, no mask of their own): calls with images are served (tests/test_wrappers.py proves it exact)
MEDIA = ("got_ocr2", "fuyu") if V5 else ()
TEXT_MODEL_ALIASES = ("qwen3_5", "qwen3_5_moe", "llama4", "mllama", "emu3", "dots3_note", "qwen4_exp")


@kvl.hookimpl
def kvpress_lite_register_adapters(register):
    register(kvl.Wrapper(model_types=tuple(t for t in WRAPPERS if t not in MEDIA),
                         description="multimodal wrapper: its language model is pressed"))
    register(kvl.Wrapper(model_types=MEDIA, media=True, description="multimodal wrapper: its language model is "
                         "pressed, its image tokens are ordinary cache entries"))
    register(kvl.Wrapper(model_types=TEXT_MODEL_ALIASES, description="built as its text model by AutoModelForCausalLM"))
    if not V5:
        register(kvl.Refusal(model_types=("fuyu", "got_ocr2"), reason="a multimodal wrapper verified on transformers >= 5 only "
                             "(the suite does not build it tiny on 4.x)"))
