"""A pressed cache written to disk and read back exactly: safetensors for the tensors, JSON for the rest.

A pressed stream is small and fixed (``capacity`` entries per layer plus the press's
per-stream state: counts, the ids of the sinks and of the recent tokens, the scheme's
pristine sink keys), so a conversation can be kept across restarts. :func:`save_cache`
writes the cache's layers and the stream state the press attached to it into one
``.safetensors`` file (the structure as JSON in its metadata), atomically: to a temporary
file in the same folder, then renamed, so a crash leaves the previous file or the new
one, never half of one. :func:`load_cache` rebuilds the cache for the same model; the
next call continues the stream as if it had never left memory (tested: equal logits).

Tensors shared between places (the press keeps a reference to each layer's keys to notice
a cache changed behind its back) are written once and shared again when read.

>>> kvl.save_cache(cache, "chat.safetensors", extra={"turn": 3})     # doctest: +SKIP
>>> cache, extra = kvl.load_cache("chat.safetensors", model)         # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from . import cache_access
from .errors import KVPressLiteError
from .stream import LayerState, Stream

FORMAT = "kvpress-lite-cache/1"
_CLASSES = {"Stream": Stream, "LayerState": LayerState}


class CacheFileError(KVPressLiteError, ValueError):
    """A cache file that cannot be read back for this model (another format, model or layout)."""


class _Writer:
    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self._names: dict[int, str] = {}

    def encode(self, value: Any) -> Any:
        if torch.is_tensor(value):
            name = self._names.get(id(value))
            if name is None:
                name = self._names[id(value)] = f"t{len(self._names)}"
                data = value.detach().to("cpu")
                self.tensors[name] = (torch.view_as_real(data) if data.is_complex() else data).contiguous().clone()
            return {"tensor": name, "complex": True} if value.is_complex() else {"tensor": name}
        if isinstance(value, (bool, int, float, str)) or value is None:
            return value
        if isinstance(value, torch.dtype):
            return {"dtype": str(value).removeprefix("torch.")}
        if isinstance(value, torch.device):
            return {"device": str(value)}
        if isinstance(value, (list, tuple)):
            return {"list" if isinstance(value, list) else "tuple": [self.encode(v) for v in value]}
        if isinstance(value, dict):
            return {"dict": [[self.encode(k), self.encode(v)] for k, v in value.items()]}
        if dataclasses.is_dataclass(value) and type(value).__name__ in _CLASSES:
            return {"object": type(value).__name__,
                    "fields": {f.name: self.encode(getattr(value, f.name)) for f in dataclasses.fields(value)}}
        raise CacheFileError(f"cannot write a {type(value).__name__} ({value!r:.80}) into a cache file")


class _Reader:
    def __init__(self, tensors: dict[str, torch.Tensor], device: torch.device) -> None:
        self.tensors = {k: v.to(device) for k, v in tensors.items()}
        self._complex: dict[str, torch.Tensor] = {}

    def decode(self, value: Any) -> Any:
        if not isinstance(value, dict):
            return value
        if "tensor" in value:
            name = value["tensor"]
            if value.get("complex"):  # stored as its real view (safetensors has no complex dtypes); one object per name
                return self._complex.setdefault(name, torch.view_as_complex(self.tensors[name]))
            return self.tensors[name]
        if "dtype" in value:
            return getattr(torch, value["dtype"])
        if "device" in value:
            return torch.device(value["device"])
        if "list" in value:
            return [self.decode(v) for v in value["list"]]
        if "tuple" in value:
            return tuple(self.decode(v) for v in value["tuple"])
        if "dict" in value:
            return {self.decode(k): self.decode(v) for k, v in value["dict"]}
        if "object" in value:
            fields = {k: self.decode(v) for k, v in value["fields"].items()}
            obj = _CLASSES[value["object"]](**fields)
            for name, field_value in fields.items():  # what __post_init__ set, back to the saved value
                setattr(obj, name, field_value)
            return obj
        raise CacheFileError(f"unknown entry in a cache file: {value!r:.80}")


def save_cache(cache: Any, path: str | os.PathLike, extra: Optional[dict] = None) -> Path:
    """Write ``cache`` (a ``DynamicCache`` a press filled, or any dynamic cache) and ``extra``
    (numbers, strings, lists, dicts and tensors) to ``path``, atomically. Returns the path.

    >>> save_cache(cache, "session.safetensors", extra={"turn": 3})      # doctest: +SKIP
    """
    from safetensors.torch import save_file

    layers = cache_access.cache_layers(cache)
    writer = _Writer()
    structure = {
        "format": FORMAT,
        "cache_class": type(cache).__name__,
        "layers": [{"class": type(layer).__name__, "state": writer.encode(dict(vars(layer)))} for layer in layers],
        "stream": writer.encode(cache_access.stream_of(cache)),
        "extra": writer.encode(extra or {}),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(writer.tensors, tmp, metadata={"kvpress_lite": json.dumps(structure)})
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_cache(path: str | os.PathLike, model: nn.Module) -> tuple[Any, dict]:
    """Read a file :func:`save_cache` wrote back into a cache for ``model``; returns
    ``(cache, extra)``. Refused, naming why, when the file is not one or its layers are not
    those of ``model``'s cache.

    >>> cache, extra = load_cache("session.safetensors", model)          # doctest: +SKIP
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        structure = json.loads(meta["kvpress_lite"])
    except (OSError, KeyError, ValueError, Exception) as exc:  # safetensors raises its own error types
        raise CacheFileError(f"{path} is not a kvpress-lite cache file: {exc}") from exc
    if structure.get("format") != FORMAT:
        raise CacheFileError(f"{path} has format {structure.get('format')!r}; this kvpress-lite reads {FORMAT!r}")
    device = next(model.parameters()).device
    reader = _Reader(load_file(str(path)), device)
    cache = cache_access.new_dynamic_cache(model)
    layers = cache_access.cache_layers(cache)
    saved = structure["layers"]
    got = [type(layer).__name__ for layer in layers]
    want = [layer["class"] for layer in saved]
    if type(cache).__name__ != structure["cache_class"] or got[: len(want)] != want:
        raise CacheFileError(
            f"{path} holds a {structure['cache_class']} with layers {want}, but this model's cache is a "
            f"{type(cache).__name__} with layers {got}: it was written for another model"
        )
    for layer, entry in zip(layers, saved):
        for name, value in reader.decode(entry["state"]).items():
            setattr(layer, name, value)
    stream = reader.decode(structure["stream"])
    if stream is not None:
        cache_access.attach_stream(cache, stream)
    return cache, reader.decode(structure["extra"])
