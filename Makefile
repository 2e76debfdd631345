# The two README commands. Each installs what it needs first (scripts/bootstrap.sh).
.PHONY: demo test lint bench-objectives test-vllm test-verl

demo:
	bash scripts/bootstrap.sh dev
	.venv/bin/tether train

# The suite, then the verl parity tests against verl's own code (test-verl: its own PYTHONPATH, so verl's
# packages never sit on the path of the main run).
test:
	bash scripts/bootstrap.sh dev,hf,parquet,math,tensorboard,wandb,mlflow,bench,trl,agents,dist
	.venv/bin/python -m pytest -q -p no:cacheprovider --timeout=300 -n auto --dist loadfile tests
	$(MAKE) --no-print-directory test-verl

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

# verl's loss code beside the main venv (.venv made by `make test`; .venv-verl, about 30 MB), then the parity tests against it;
# TETHER_REQUIRE_VERL=1 makes a verl that does not import a failure, not a skip.
test-verl:
	bash scripts/setup_verl.sh
	TETHER_REQUIRE_VERL=1 PYTHONPATH=$$PWD:$$PWD/.venv-verl .venv/bin/python -m pytest -q -p no:cacheprovider \
		--timeout=300 tests/unit/test_verl_parity.py
