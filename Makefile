# The two commands of the README: `make demo` and `make test`. Both create the environment first.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: mutation demo airflow test test-system soak lint format bench bench-quality bench-anomaly bench-encoding bench-service bench-scale clean

$(STAMP): pyproject.toml requirements.lock install.sh
	VENV=$(VENV) ./install.sh
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/sae-pipeline demo

# The DAGs in a local Airflow (standalone, SQLite under .airflow/) until Ctrl-C; it prints the
# logins. CONFIG= and POLICY= (default: the SAE_CONFIG and SAE_DRIFT_POLICY variables), PORT= (8080).
airflow: $(STAMP)
	$(VENV)/bin/sae-pipeline airflow --port $(or $(PORT),8080) $(if $(CONFIG),--config $(CONFIG),) $(if $(POLICY),--policy $(POLICY),)

# The suite but its long end-to-end tests (marker `system`), which `make test-system` runs;
# .ci/run runs both, then the soak.
test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest -q -m "not system"

# Servers, a browser and the Celery topology: the README's walkthroughs, `make airflow`, the
# review page in Chromium, the distributed DAG runs (about 20 minutes on 2 cores).
test-system: $(STAMP)
	$(PY) -m pytest -q -m system

# The soak (issue 24, tests/dags/soak.py): the drift loop on the distributed topology under
# a fault schedule, with its own PostgreSQL and Redis; 12 to 23 minutes. SAE_SOAK_FAULTS=a,b
# runs a subset of its faults.
soak: $(STAMP)
	timeout 3000 $(PY) -m pytest -q -s tests/dags/soak.py

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: $(STAMP)
	$(PY) bench/bench_trainer.py

bench-quality: $(STAMP)
	$(PY) bench/bench_quality.py --seeds 0 1 2 3 4

# SAEAnomalyDetector vs IsolationForest, PCA, SAE error, LOF on six ADBench datasets (docs/anomaly.md).
bench-anomaly: $(STAMP)
	$(PY) bench/bench_anomaly.py --seeds 0 1 2 3 4

bench-encoding: $(STAMP)
	$(PY) bench/bench_encoding.py

# The encoder service vs the same model in-process (starts a server on the champion).
bench-service: $(STAMP)
	$(PY) bench/bench_service.py

# Training steps at 1M/4M/16M rows, each in its own process (long: about an hour on 2 cores).
bench-scale: $(STAMP)
	$(PY) bench/bench_scale.py --train $(if $(ROWS),--rows $(ROWS),) $(if $(MAX_STEPS),--max-steps $(MAX_STEPS),)

clean:
	rm -rf artifacts .airflow

# Mutation testing (mutmut; config in pyproject.toml) of the modules that guard trust and
# correctness: the trust boundary and steps/deployment.py, the promotion gate and the champion
# pair, the trainer's optimiser and schedule, the drift decision. Prints the score per module
# and every surviving mutant (`mutmut show NAME` gives its diff). Not part of `make test`.
MUTANTS := "sae_pipeline.boundary.*" "sae_pipeline.steps.deployment.*" \
	"sae_pipeline.registry.gate.*" "sae_pipeline.registry.promotion.*" \
	"sae_pipeline.engine.trainer.x_make_optimizer__*" "sae_pipeline.engine.trainer.x_learning_rate__*" \
	"sae_pipeline.monitoring.drift.x_decide__*"
mutation: $(STAMP)
	$(VENV)/bin/uv pip install --quiet --python $(PY) --constraints requirements.lock mutmut==3.8.1
	$(VENV)/bin/mutmut run --max-children $${MUTATION_JOBS:-2} $(MUTANTS)
	$(PY) tests/mutation_report.py $(MUTANTS)
