"""Conformance suite settings: one thread, quiet transformers, and the support table written at
the end of the session when ``KVPRESS_LITE_SUPPORT_TABLE=path`` is set."""

import logging
import os
import warnings

import torch

torch.set_num_threads(1)

try:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
except Exception:  # pragma: no cover
    pass

SUPPORT_TABLE_ENV = "KVPRESS_LITE_SUPPORT_TABLE"


def pytest_configure(config):
    warnings.filterwarnings("ignore", message=".*(rope|RoPE|tie_word_embeddings|config).*")
    logging.getLogger("transformers").setLevel(logging.ERROR)


def pytest_sessionfinish(session, exitstatus):
    path = os.environ.get(SUPPORT_TABLE_ENV)
    if not path:
        return
    from support import RESULTS, support_table

    if not RESULTS:
        return
    with open(path, "w") as f:
        f.write(support_table())
