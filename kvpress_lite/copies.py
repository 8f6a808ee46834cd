"""What a copy of a pressed model is: a cleanly unpressed model, with no press hooks.

A press registers hooks on the model's modules and keeps the stream's state in its own
objects. Copying the hooks into a copy of the model would make a half-pressed model whose
hooks drive the *original* press's streams. So:

* ``copy.deepcopy(pressed_model)`` (or of the module the press hooks, the decoder) gives
  a model with none of the press's hooks: the press puts a ``__deepcopy__`` on those
  instances that copies the model as usual and then drops, in the copy, every hook the
  press registered. Apply a press to the copy if it should stream too.
* ``pickle`` / ``torch.save`` of the whole model cannot run code in the copy afterwards:
  each press hook is pickled as an inert hook that does nothing (the copy behaves densely
  and calls none of the press's code); applying a press to such a copy clears them.

>>> import copy, kvpress_lite as kvl                                  # doctest: +SKIP
>>> with kvl.apply_press(model, n_sink=4, capacity=64):              # doctest: +SKIP
...     twin = copy.deepcopy(model)                                   # doctest: +SKIP
>>> kvl.copies.press_hooks(twin)                                      # doctest: +SKIP
0
"""

from __future__ import annotations

import copy
from typing import Any

from torch import nn

_HOOK_DICTS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks", "_forward_hooks_with_kwargs",
               "_forward_hooks_always_called")


def _inert(*args: Any) -> None:
    """What a press hook becomes in a pickled copy of the model: nothing."""
    return None


def _inert_hook() -> Any:
    return _inert


class PressHook:
    """A press hook as registered on a module (see the module docstring for its copies)."""

    def __init__(self, fn: Any) -> None:
        self.fn = fn

    def __call__(self, *args: Any) -> Any:
        return self.fn(*args)

    def __reduce__(self):
        return (_inert_hook, ())


def _is_press_hook(hook: Any) -> bool:
    return isinstance(hook, PressHook) or hook is _inert


def press_hooks(model: nn.Module) -> int:
    """How many press hooks (live or inert) the modules of ``model`` carry."""
    return sum(_is_press_hook(h) for m in model.modules() for h in (*m._forward_pre_hooks.values(),
                                                                     *m._forward_hooks.values()))


def strip_press_hooks(model: nn.Module, live: bool = True) -> None:
    """Drop every press hook from the modules of ``model`` (a copy); ``live=False``: only the
    inert ones a pickled copy carries (a press being applied to it clears them)."""
    for module in model.modules():
        for table in ("_forward_pre_hooks", "_forward_hooks"):
            hooks = getattr(module, table)
            for key in [k for k, h in hooks.items() if (_is_press_hook(h) if live else h is _inert)]:
                del hooks[key]
                for extra in _HOOK_DICTS:
                    if extra != table:
                        getattr(module, extra, {}).pop(key, None)
        if live or module.__dict__.get("__deepcopy__", 0) is None:
            module.__dict__.pop("__deepcopy__", None)


class _CopyWithoutPress:
    """An instance ``__deepcopy__``: the usual deep copy, then the copy's press hooks dropped."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __call__(self, memo: dict) -> nn.Module:
        module = self.module
        del module.__dict__["__deepcopy__"]  # so that copy.deepcopy takes its usual path
        try:
            clone = copy.deepcopy(module, memo)
        finally:
            module.__dict__["__deepcopy__"] = self
        strip_press_hooks(clone)
        return clone

    def __reduce__(self):  # pickled along with the model: the unpickled one copies the usual way
        return (type(None), ())


def copy_without_press(*modules: nn.Module) -> None:
    """Make ``copy.deepcopy`` of each of ``modules`` return a copy without press hooks."""
    for module in modules:
        module.__dict__["__deepcopy__"] = _CopyWithoutPress(module)


def copy_as_usual(*modules: nn.Module) -> None:
    """Undo :func:`copy_without_press` (the press is removed)."""
    for module in modules:
        if isinstance(module.__dict__.get("__deepcopy__"), _CopyWithoutPress):
            del module.__dict__["__deepcopy__"]
