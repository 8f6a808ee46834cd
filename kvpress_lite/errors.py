"""Exceptions raised by kvpress-lite. Every message says what went wrong and what to do."""

from __future__ import annotations


class KVPressLiteError(Exception):
    """Base class of every error kvpress-lite raises on purpose."""


class UnsupportedModelError(KVPressLiteError, ValueError):
    """No adapter recognises the model, or the model uses something the press cannot serve
    (for example length-dependent RoPE scaling)."""


class UnsupportedGenerationError(KVPressLiteError, RuntimeError):
    """The model was driven in a way the press cannot serve correctly: beam search, assisted
    decoding, a static or sliding-window cache, or a cache changed outside the press."""


class PressAlreadyAppliedError(KVPressLiteError, RuntimeError):
    """The model already carries a press; two sets of hooks would fight over one cache."""
