# The two README commands. Each installs what it needs first (scripts/bootstrap.sh).
.PHONY: demo test lint bench-objectives test-vllm

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

# The vLLM rollout engine: its own venv (.venv-vllm), then the tests that start the real server.
test-vllm:
	bash scripts/bootstrap.sh dev,hf
	bash scripts/setup_vllm.sh
	TETHER_VLLM=1 .venv/bin/python -m pytest -q -p no:cacheprovider --timeout=900 -m vllm tests/engine/test_vllm_real.py
