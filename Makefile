# The two commands of the README: `make demo` and `make test`.
.PHONY: setup demo test bench lint

setup:
	@scripts/setup.sh

demo: setup
	.venv/bin/python -m cpmproxy.demo

test: setup
	.venv/bin/pytest -q

bench: setup
	.venv/bin/python bench/run.py

lint: setup
	.venv/bin/ruff check cpmproxy plugins tests bench
