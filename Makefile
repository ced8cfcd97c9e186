# On a fresh machine: `make demo` (train -> sample -> OOD on shipped MNIST, offline), `make test`
# (the fast suite, under 5 minutes on 2 CPU cores) and `make test-all` (everything, as CI runs it).
# Each creates .venv on first use, with ddpm-hf installed in it (`pip install -e ".[test]" -c requirements.txt`).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-requirements
DEMO := outputs/quickstart
SHIPPED := pretrained/ddpm-mnist5k
# One pytest worker per core, each test file on one worker (its module fixtures are built once);
# the tests' scripts then run one thread each (tests/conftest.py). `make test XDIST=` runs serially.
XDIST ?= -n auto --dist loadfile
DETECTOR := --score hidden --stats_samples 1000
SHIPPED_OOD := --sample_timesteps 20 --recon_factors 0.1 0.2 0.3 0.4 0.5 --max_samples 200 --stats_samples 128

.PHONY: demo test test-all test-slow lint venv clean-demo

venv: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# ddpm-hf itself (editable) with every extra, pytest and pytest-xdist; requirements.txt as constraints,
	# so the ranges of pyproject.toml resolve to exactly the tested pins.
	$(PY) -m pip install -q -e ".[test]" -c requirements.txt
	# animal-mnist declares tensorflow, which we do not need: install it without dependencies.
	$(PY) -m pip install -q --no-deps animal-mnist==0.4
	touch $(STAMP)

demo: $(STAMP)
	# 1. The shipped reference model (pretrained/ddpm-mnist5k, trained with configs/mnist5k.yaml): 64 samples and
	#    its out-of-distribution report against Animal-MNIST (the five-level score).
	HF_HUB_OFFLINE=1 $(PY) sample_ddpm.py --config configs/mnist5k.yaml --checkpoint $(SHIPPED) --output_dir outputs/pretrained/generated --num_samples 64 --overwrite_output_dir
	HF_HUB_OFFLINE=1 $(PY) ood_ddpm.py --config configs/mnist5k.yaml --checkpoint $(SHIPPED) --output_dir outputs/pretrained/ood $(SHIPPED_OOD) --overwrite_output_dir
	#    A detector fitted once on the shipped model (the recommended score, docs/ood.md), then asked about new
	#    images: a folder of digits, rotated and flipped digits and animals (examples/mixed).
	HF_HUB_OFFLINE=1 $(PY) ood_ddpm.py --fit --checkpoint $(SHIPPED) --dataset mnist5k $(DETECTOR) --output_dir outputs/pretrained/detector --overwrite_output_dir
	HF_HUB_OFFLINE=1 $(PY) ood_ddpm.py --detector outputs/pretrained/detector --images examples/mixed --output_dir outputs/pretrained/flagged --overwrite_output_dir
	# 2. Train the quickstart model yourself (20,000 images seen), sample it and run the same report.
	HF_HUB_OFFLINE=1 $(PY) train_ddpm.py --config configs/quickstart.yaml --output_dir $(DEMO) --overwrite_output_dir
	HF_HUB_OFFLINE=1 $(PY) sample_ddpm.py --config configs/quickstart.yaml --checkpoint $(DEMO) --output_dir $(DEMO)/generated --num_samples 64 --overwrite_output_dir
	HF_HUB_OFFLINE=1 $(PY) ood_ddpm.py --config configs/quickstart.yaml --checkpoint $(DEMO) --output_dir $(DEMO)/ood --overwrite_output_dir

# Unit tests and a thin end-to-end path (train -> sample -> OOD on a tiny model); no test marked slow
# (the slow ones: the longer end-to-end and robustness runs, in `make test-slow` and CI).
test: $(STAMP)
	$(PY) -m pytest -q $(XDIST) -m "not slow" tests

# Only the slow end-to-end tests (@pytest.mark.slow).
test-slow: $(STAMP)
	$(PY) -m pytest -q $(XDIST) -m slow tests

# ruff: lint and format check (settings in pyproject.toml); CI runs it before the tests.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# Everything: what CI (.ci/run) runs.
test-all: $(STAMP)
	$(PY) -m pytest -q $(XDIST) tests

clean-demo:
	rm -rf $(DEMO)
