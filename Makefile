# Two commands do all set-up on a fresh machine:
#   make run    -> creates .venv if needed, then runs the headline job `bgn-task fsl --norm bgn`
#   make test   -> creates .venv if needed, then runs the test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.bgn-installed

.PHONY: run test lint bench install clean

$(STAMP): pyproject.toml setup.py scripts/install_learn2learn.sh
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	bash scripts/install_learn2learn.sh $(BIN)/python
	$(BIN)/python -m pip install -q -e ".[dev]"
	$(BIN)/python -c "import bgn_lightning as b; print('BGN CPU kernels built:', b.cpu_kernels_available())"
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/bgn-task fsl --norm bgn

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) build *.egg-info
