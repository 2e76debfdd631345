# The two README commands. Each installs what it needs first (scripts/bootstrap.sh).
.PHONY: demo test lint bench-objectives

demo:
	bash scripts/bootstrap.sh dev
	.venv/bin/tether train

test:
	bash scripts/bootstrap.sh dev,hf,parquet,math,tensorboard,wandb,mlflow,bench
	.venv/bin/python -m pytest -q -p no:cacheprovider --timeout=300 tests

lint:
	bash scripts/bootstrap.sh dev
	.venv/bin/ruff check .

bench-objectives:
	bash scripts/bootstrap.sh dev
	.venv/bin/python benchmarks/objectives.py
