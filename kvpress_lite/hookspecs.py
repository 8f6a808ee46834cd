"""The plugin surface of kvpress-lite: one hook, through which a plugin registers adapters.

A plugin is a module (or object) exposed in the ``kvpress_lite`` entry-point group::

    # pyproject.toml of your package
    [project.entry-points.kvpress_lite]
    cohere = "kvpress_lite_cohere"

    # kvpress_lite_cohere.py
    import kvpress_lite as kvl

    @kvl.hookimpl
    def kvpress_lite_register_adapters(register):
        register(kvl.Adapter(name="cohere", model_types=("cohere",), attention_path="layers.*.self_attn",
                             positions=kvl.rope_positions(interleaved=True)))

The built-in adapters (``kvpress_lite_adapters.gpt_neox``, ``.llama``, ``.gpt2``) are
plugins of exactly this kind, declared in kvpress-lite's own ``pyproject.toml``.
"""

from __future__ import annotations

from typing import Callable

import pluggy

PROJECT = "kvpress_lite"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def kvpress_lite_register_adapters(register: Callable[..., None]) -> None:
    """Call ``register(adapter)`` once for every :class:`kvpress_lite.Adapter` this plugin
    provides (zero, one or several), and ``register(kvpress_lite.Refusal(...))`` for model
    types the press must refuse, with the reason. kvpress-lite validates each one and records
    which plugin and distribution it came from."""
