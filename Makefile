# Two commands on a fresh machine: `make demo` (train -> sample -> OOD on shipped MNIST)
# and `make test`. Each creates .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-requirements
DEMO := outputs/quickstart

.PHONY: demo test venv clean-demo

venv: $(STAMP)

$(STAMP): requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	# animal-mnist declares tensorflow, which we do not need: install it without dependencies.
	$(PY) -m pip install -q --no-deps animal-mnist==0.4
	touch $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) train_ddpm.py --config configs/quickstart.yaml --output_dir $(DEMO) --overwrite_output_dir
	HF_HUB_OFFLINE=1 $(PY) sample_ddpm.py --config configs/quickstart.yaml --checkpoint $(DEMO) --output_dir $(DEMO)/generated --num_samples 64 --overwrite_output_dir
	HF_HUB_OFFLINE=1 $(PY) ood_ddpm.py --config configs/quickstart.yaml --checkpoint $(DEMO) --output_dir $(DEMO)/ood --overwrite_output_dir

test: $(STAMP)
	$(PY) -m pytest -q tests

clean-demo:
	rm -rf $(DEMO)
