# The two commands of the README. Both set up ./venv first (scripts/setup.sh; fast when already done).
.PHONY: setup run test lint

setup:
	@bash scripts/setup.sh

run: setup  ## the main job on the built-in sample data
	venv/bin/python -m llm_training.main

test: setup lint  ## lint, then the whole test suite
	-@bash scripts/client_envs.sh  # transformers 4.x beside ./venv's 5.x for the export's client tests
	venv/bin/python -m pytest -q -n 2  # two workers: the suite is mostly single-threaded (conftest.py)

lint:
	venv/bin/ruff check .
	venv/bin/ruff format --check .
