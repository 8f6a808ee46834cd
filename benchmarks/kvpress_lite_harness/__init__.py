"""kvpress-lite's measuring harness: what the press buys and what it costs, on real models and text.

Its own distribution (``benchmarks/pyproject.toml``, ``kvpress-lite-harness``), so the
library installs with torch, transformers and pluggy alone. It adds ``kvpress-lite
perplexity``, ``bench``, ``compiled`` and ``chat`` to the library's command line through
the ``kvpress_lite.commands`` entry points.

Modules, from the bottom up:

* :mod:`.measure`: clocks, memory probes, the machine's description, methods timed side by side;
* :mod:`.report`: the one reporter (JSON, markdown, PNG) every run writes through;
* :mod:`.models` (shapes, ``tiny:<type>``, embedded real models) with :mod:`.embedded`
  (GGUF wheels read offline) and :mod:`.texts` (War and Peace and three other books);
* :mod:`.methods`: the one method vocabulary and the decoders the latency runs time;
* :mod:`.perplexity`, :mod:`.latency` (+ :mod:`.peer`, NVIDIA kvpress), :mod:`.compiled`:
  the three kinds of run, each with its markdown and figures (``*_report``);
* :mod:`.chat`: ``kvpress-lite chat``; :mod:`.cli`: the other subcommands.

>>> from kvpress_lite_harness.methods import VOCABULARY
>>> VOCABULARY["window"].split(":")[0]
'the press without sinks (n_sink=0)'
"""
