# The two set-up commands of the README: `make demo` and `make test`. Each sets up .venv first.
PY := .venv/bin/python
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo demo-short test test-slow clean

setup:
	@bash scripts/setup_env.sh

demo: setup
	$(PY) -m mlora demo

demo-short: setup
	$(PY) -m mlora demo --short

test: setup
	$(PY) -m pytest -q

test-slow: setup
	$(PY) -m pytest -q -m slow

clean:
	rm -rf .venv build *.egg-info
