"""A plugin that fails to import."""

raise ImportError("kvpress_lite_broken_import needs a module that is not installed")
