# The two commands of the README: `make demo` and `make test`.
.PHONY: setup demo test bench lint

setup:
	@scripts/setup.sh

demo: setup
	.venv/bin/python -m cpmproxy.demo

# Three test processes on a 2-CPU machine: the tests mostly wait on Dovecot and proxy processes (load
# 0.7 with one); each process has its own Dovecot. Whole files per process (module fixtures start once).
TEST_WORKERS ?= 3

test: setup
	.venv/bin/pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=15

bench: setup
	.venv/bin/python bench/run.py

lint: setup
	.venv/bin/ruff check cpmproxy plugins tests bench
