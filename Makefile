# On a fresh machine: `make demo` (train -> sample -> OOD on shipped MNIST, offline), `make test`
# (the fast suite, under 5 minutes on 2 CPU cores) and `make test-all` (everything, as CI runs it).
# Each creates .venv on first use, with ddpm-hf installed in it (`pip install -e ".[test]"`).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-requirements
DEMO := outputs/quickstart

.PHONY: demo test test-all test-slow venv clean-demo

venv: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# ddpm-hf itself (editable), its pinned dependencies (requirements.txt) and pytest.
	$(PY) -m pip install -q -e ".[test]"
	# animal-mnist declares tensorflow, which we do not need: install it without dependencies.
	$(PY) -m pip install -q --no-deps animal-mnist==0.4
	touch $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) train_ddpm.py --config configs/quickstart.yaml --output_dir $(DEMO) --overwrite_output_dir
	HF_HUB_OFFLINE=1 $(PY) sample_ddpm.py --config configs/quickstart.yaml --checkpoint $(DEMO) --output_dir $(DEMO)/generated --num_samples 64 --overwrite_output_dir
	HF_HUB_OFFLINE=1 $(PY) ood_ddpm.py --config configs/quickstart.yaml --checkpoint $(DEMO) --output_dir $(DEMO)/ood --overwrite_output_dir

# Unit tests and a thin end-to-end path (train -> sample -> OOD on a tiny model); no test marked slow.
test: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests

# Only the slow end-to-end tests (@pytest.mark.slow).
test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow tests

# Everything: what CI (.ci/run) runs.
test-all: $(STAMP)
	$(PY) -m pytest -q tests

clean-demo:
	rm -rf $(DEMO)
