# Every target sets up .venv by itself (with a Python >= 3.12 found by scripts/find-python).
VENV  := .venv
PY    := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test chaos bench schemas clean

$(STAMP): pyproject.toml
	@if [ ! -x $(PY) ]; then \
	  interp=$$(scripts/find-python) || exit 1; \
	  echo "creating $(VENV) with $$interp"; \
	  "$$interp" -m venv $(VENV) || exit 1; \
	fi
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	@touch $(STAMP)

run: $(STAMP)
	MAILBOX_HANDLER=$${MAILBOX_HANDLER:-echo} $(VENV)/bin/mailbox serve

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

# CHAOS_SEED=n re-runs a seed (default: a random one, printed); CHAOS_ARGS="--workdir d"
# keeps the journal and logs; see docs/reliability.md
chaos: $(STAMP)
	$(PY) -m tests.chaos --runs 2000 --threads 200 $(if $(CHAOS_SEED),--seed $(CHAOS_SEED),) $(CHAOS_ARGS)

# the plot needs matplotlib (the `bench` extra), installed here so `make test` stays lean
bench: $(STAMP)
	$(PY) -m pip install --quiet -e '.[test,bench]'
	$(PY) -m benchmarks.run $(BENCH_ARGS)

schemas: $(STAMP)
	$(PY) -m service.schemas

clean:
	rm -rf $(VENV) .data .pytest_cache
