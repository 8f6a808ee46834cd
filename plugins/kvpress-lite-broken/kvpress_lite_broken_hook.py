"""A plugin whose hook raises."""

import kvpress_lite as kvl


@kvl.hookimpl
def kvpress_lite_register_adapters(register):
    raise RuntimeError("this plugin's hook is broken on purpose")
