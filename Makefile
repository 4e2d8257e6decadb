# make demo : create .venv if missing, then train the embedded tiny GPT on CPU with fine-grained experts,
#             the product-key router, a PEER layer and balancing, and analyse its routing (examples/cpu_quickstart.sh)
# make test : create .venv if missing, then run the test suite
VENV ?= .venv
# python3.12 from PATH, else pyenv's 3.12 install (pyenv shims refuse versions not selected).
PYTHON312 ?= $(shell for p in python3.12 $$HOME/.pyenv/versions/3.12*/bin/python3.12 /usr/local/bin/python3.12 /usr/bin/python3.12; do \
	$$p -c 'import sys; assert sys.version_info[:2] == (3, 12)' >/dev/null 2>&1 && { echo $$p; break; }; done)
STAMP := $(VENV)/.installed

.PHONY: demo test venv clean

$(STAMP): setup.cfg pyproject.toml
	@test -n "$(PYTHON312)" || { echo "Python 3.12 not found: install it (e.g. pyenv install 3.12) or pass PYTHON312=/path/to/python3.12"; exit 1; }
	$(PYTHON312) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	MEGATRON_MOE_EXT=$(VENV)/bin/megatron-moe-ext bash examples/cpu_quickstart.sh

# Two pytest workers, one test file each at a time (module fixtures train once): the end-to-end runs
# leave a core idle while they start, import and save, so two files in flight use both cores.
TEST_WORKERS ?= 2
test: $(STAMP)
	$(VENV)/bin/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

clean:
	rm -rf $(VENV) runs
