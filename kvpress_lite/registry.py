"""The adapter registry: one pluggy ``PluginManager`` fed by the ``kvpress_lite`` entry points.

Built-in and third-party adapters arrive through the same door. A plugin that fails to
import, or whose hook raises, is reported with a warning naming it and is skipped; the
others keep working. ``KVPRESS_LITE_PLUGINS=name1,name2`` restricts which entry points load
(useful in tests); ``KVPRESS_LITE_PLUGINS=`` (empty) loads none.

>>> [a.name for a in available_adapters()]  # doctest: +SKIP
['gpt2', 'gpt_neox', 'llama']
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from importlib import metadata
from typing import Any, Optional

import pluggy
from torch import nn

from . import hookspecs
from .adapter import Adapter, Refusal, Wrapper
from .errors import UnsupportedModelError
from .wrappers import text_view

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "kvpress_lite"
PLUGINS_ENV = "KVPRESS_LITE_PLUGINS"

HOW_TO_ADD = (
    "To support another family, publish a plugin: a module with a `kvpress_lite_register_adapters(register)` "
    "hook (decorated with `kvpress_lite.hookimpl`) that calls `register(kvpress_lite.Adapter(...))`, declared under "
    "`[project.entry-points.kvpress_lite]` in its pyproject.toml. See the README, 'Writing an adapter plugin'."
)


@dataclass(frozen=True)
class AdapterInfo:
    """An adapter found in the registry, with where it came from."""

    name: str
    model_types: tuple[str, ...]
    plugin: str
    distribution: Optional[str]
    version: Optional[str]
    adapter: Adapter


class Registry:
    """Loads plugins once and answers which adapter serves a model."""

    def __init__(self) -> None:
        self.manager = pluggy.PluginManager(hookspecs.PROJECT)
        self.manager.add_hookspecs(hookspecs)
        self.problems: list[str] = []
        self._dists: dict[str, tuple[Optional[str], Optional[str]]] = {}
        self._adapters: Optional[dict[str, AdapterInfo]] = None
        self._refusals: dict[str, tuple[str, str]] = {}  # model_type -> (reason, plugin)
        self._wrappers: dict[str, tuple[str, str]] = {}  # model_type -> (description, plugin)
        self._media: set[str] = set()  # wrappers whose media calls are served (Wrapper.media)

    # -- loading -----------------------------------------------------------------
    def load_entry_points(self) -> None:
        wanted = os.environ.get(PLUGINS_ENV)
        allowed = None if wanted is None else {n.strip() for n in wanted.split(",") if n.strip()}
        points = sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name)
        unknown = sorted(allowed - {ep.name for ep in points}) if allowed is not None else []
        if unknown:
            self._report(
                f"{PLUGINS_ENV} names plugins that are not installed: {', '.join(unknown)}; installed: "
                f"{', '.join(ep.name for ep in points) or 'none'}. Only the installed ones named there are loaded."
            )
        for ep in points:
            if allowed is not None and ep.name not in allowed:
                continue
            if self.manager.has_plugin(ep.name):
                continue
            dist = getattr(ep, "dist", None)
            try:
                plugin = ep.load()
            except Exception as exc:  # a broken plugin must not take the others down
                self._report(f"kvpress-lite plugin {ep.name!r} ({ep.value}) failed to import and was skipped: {exc!r}")
                continue
            self.register_plugin(plugin, ep.name, dist.metadata["Name"] if dist else None, dist.version if dist else None)

    def register_plugin(self, plugin: Any, name: str, distribution: str | None = None, version: str | None = None) -> None:
        """Register a plugin object (module or instance) by hand, e.g. in a test or a notebook."""
        self.manager.register(plugin, name=name)
        self._dists[name] = (distribution, version)
        self._adapters = None

    def _report(self, message: str) -> None:
        self.problems.append(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)
        logger.warning(message)

    # -- adapters ------------------------------------------------------------------
    def adapters(self) -> dict[str, AdapterInfo]:
        if self._adapters is not None:
            return self._adapters
        found: dict[str, AdapterInfo] = {}
        refusals: dict[str, tuple[str, str]] = {}
        wrappers: dict[str, tuple[str, str]] = {}
        media: set[str] = set()
        for impl in self.manager.hook.kvpress_lite_register_adapters.get_hookimpls():
            plugin_name = impl.plugin_name
            dist, version = self._dists.get(plugin_name, (None, None))
            collected: list = []

            def register(item: Adapter | Refusal | Wrapper, _sink: list = collected) -> None:
                if not isinstance(item, (Adapter, Refusal, Wrapper)):
                    raise TypeError(
                        "register() takes a kvpress_lite.Adapter, Refusal or Wrapper, got " + type(item).__name__
                    )
                _sink.append(item)

            try:
                impl.function(register=register)
            except Exception as exc:
                self._report(f"kvpress-lite plugin {plugin_name!r} raised in kvpress_lite_register_adapters and was skipped: {exc!r}")
                continue
            for item in collected:
                if isinstance(item, Refusal):
                    for model_type in item.model_types:
                        refusals.setdefault(model_type, (item.reason, plugin_name))
                    continue
                if isinstance(item, Wrapper):
                    for model_type in item.model_types:
                        wrappers.setdefault(model_type, (item.description, plugin_name))
                        if item.media:
                            media.add(model_type)
                    continue
                if item.name in found:
                    self._report(
                        f"adapter name {item.name!r} from plugin {plugin_name!r} is already provided by "
                        f"plugin {found[item.name].plugin!r}; the later one is ignored"
                    )
                    continue
                found[item.name] = AdapterInfo(item.name, item.model_types, plugin_name, dist, version, item)
        self._adapters, self._refusals, self._wrappers, self._media = found, refusals, wrappers, media
        return found

    def refusals(self) -> dict[str, tuple[str, str]]:
        """``model_type -> (reason, plugin)`` for every type a plugin declared it refuses."""
        self.adapters()
        return self._refusals

    def wrappers(self) -> dict[str, tuple[str, str]]:
        """``model_type -> (description, plugin)`` for every composite type served through its text model."""
        self.adapters()
        return self._wrappers

    def serves_media(self, model_type: Optional[str]) -> bool:
        """True for a wrapper whose media tokens are ordinary cache entries (``Wrapper(media=True)``)."""
        self.adapters()
        return model_type in self._media

    def find(self, model: nn.Module, name: str | None = None) -> Adapter:
        adapters = self.adapters()
        listing = ", ".join(f"{a.name} ({', '.join(a.model_types)}; from {a.distribution or a.plugin})" for a in adapters.values()) or "none"
        if name is not None:
            if name not in adapters:
                raise UnsupportedModelError(f"no adapter named {name!r}. Adapters found: {listing}. {HOW_TO_ADD}")
            return adapters[name].adapter
        matching = [a for a in adapters.values() if a.adapter.matches(model)]
        if not matching and model_type_of(model) in self._wrappers:
            view = text_view(model)  # a multimodal wrapper: the adapter of its text model serves it
            if view is not None:
                matching = [a for a in adapters.values() if a.adapter.matches(view)]
                if not matching and model_type_of(view) in self._refusals:
                    reason, plugin = self._refusals[model_type_of(view)]
                    raise UnsupportedModelError(
                        f"kvpress-lite does not serve {type(model).__name__} (model_type={model_type_of(model)!r}): "
                        f"its language model ({model_type_of(view)!r}) is refused: {reason} (declared by plugin "
                        f"{plugin!r}). {HOW_TO_ADD}"
                    )
        if not matching:
            model_type = getattr(getattr(model, "config", None), "model_type", None)
            if model_type in self._refusals:
                reason, plugin = self._refusals[model_type]
                raise UnsupportedModelError(
                    f"kvpress-lite does not serve {type(model).__name__} (model_type={model_type!r}): {reason} "
                    f"(declared by plugin {plugin!r}). {HOW_TO_ADD}"
                )
            raise UnsupportedModelError(
                f"no kvpress-lite adapter recognises {type(model).__name__} (model_type={model_type!r}). "
                f"Adapters found: {listing}. {HOW_TO_ADD}"
            )
        if len(matching) > 1:
            logger.warning(
                "several adapters match %s: %s; using %r (pass adapter=... to choose)",
                type(model).__name__, [a.name for a in matching], matching[0].name,
            )
        return matching[0].adapter


def model_type_of(model: Any) -> Optional[str]:
    return getattr(getattr(model, "config", None), "model_type", None)


_REGISTRY: Optional[Registry] = None


def get_registry(reload: bool = False) -> Registry:
    """The process-wide registry, loading entry points on first use (or again with ``reload=True``)."""
    global _REGISTRY
    if _REGISTRY is None or reload:
        _REGISTRY = Registry()
        _REGISTRY.load_entry_points()
    return _REGISTRY


def available_adapters() -> list[AdapterInfo]:
    """Every adapter found, with the plugin and distribution that provided it.

    >>> sorted(a.name for a in available_adapters())  # doctest: +SKIP
    ['gpt2', 'gpt_neox', 'llama']
    """
    return sorted(get_registry().adapters().values(), key=lambda a: a.name)


@dataclass(frozen=True)
class Support:
    """What the installed plugins say about one ``model_type``: ``status`` is ``"accepted"``
    (an adapter serves it), ``"refused"`` (a plugin declared why not) or ``"unknown"`` (no
    plugin knows it: apply_press refuses it too)."""

    model_type: str
    status: str
    adapter: Optional[str]
    detail: str


def support_for(model_type: str) -> Support:
    """Whether the installed adapters serve ``model_type``, and which one or why not.

    >>> support_for("llama").status  # doctest: +SKIP
    'accepted'
    """
    registry = get_registry()
    for info in registry.adapters().values():
        if model_type in info.model_types:
            return Support(model_type, "accepted", info.name, info.adapter.description or info.plugin)
    refusal = registry.refusals().get(model_type)
    if refusal is not None:
        return Support(model_type, "refused", None, refusal[0])
    if model_type in registry.wrappers():  # served through its text model, whose support it takes
        text_type = _text_type(model_type)
        inner = support_for(text_type) if text_type and text_type != model_type else None
        if inner is not None and inner.status != "unknown":
            return Support(model_type, inner.status, inner.adapter, f"through its text model {text_type}: {inner.detail}")
    return Support(model_type, "unknown", None, "no adapter recognises this model type")


def _text_type(model_type: str) -> Optional[str]:
    try:
        from transformers import AutoConfig

        config = AutoConfig.for_model(model_type)
        return getattr(config.get_text_config(), "model_type", None)
    except Exception:
        return None


def find_adapter(model: nn.Module, name: str | None = None) -> Adapter:
    """The adapter serving ``model`` (or the one called ``name``); raises :class:`UnsupportedModelError`.

    Logs once per process when the installed transformers is newer than the newest release
    the conformance suite ran on (:mod:`kvpress_lite.releases`).

    >>> find_adapter(model).name  # doctest: +SKIP
    'llama'
    """
    from .releases import warn_if_unverified

    warn_if_unverified()
    return get_registry().find(model, name)
