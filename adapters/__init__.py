"""kvpress-lite's built-in adapters, one file per family. Installed as ``kvpress_lite_adapters``
and loaded through the ``kvpress_lite`` entry-point group, like any third-party plugin."""
