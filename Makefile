# Two commands do all the set-up on a fresh machine:
#   make demo   - create .venv, install ondevice, benchmark the embedded default model
#   make test   - create .venv, install ondevice with its test extras, run the test suite
PY ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
EXTRAS ?= server,eval,models,protect,test,agent,lmeval,adapt,clients

.PHONY: demo test install install-dev bench-peers clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

install: $(BIN)/python
	$(BIN)/pip install --quiet -e .

install-dev: $(BIN)/python
	$(BIN)/pip install --quiet -e ".[$(EXTRAS)]"

demo: install
	$(BIN)/ondevice bench

test: install-dev
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) build src/*.egg-info
