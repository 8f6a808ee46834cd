"""``python -m kvpress_lite.bench ...``: the same as ``kvpress-lite bench ...``."""

import sys

from .cli import main

sys.exit(main())
