# TwinMCP — `make run` (embedded demo) and `make test` (whole suite on real PostgreSQL + Redis).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
T      ?=

export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: run test venv lint bench bench-health bench-usage bench-exports clean

$(STAMP): pyproject.toml .ci/constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -c .ci/constraints.txt -e ".[dev]"
	@touch $(STAMP)

venv: $(STAMP)

# Embedded defaults: SQLite, filesystem Celery broker, database quota counters.
run: export DEBUG ?= true
run: export EXTERNAL_MCP_ALLOWED_PROTOCOLS ?= https,http
run: export EXTERNAL_MCP_ALLOWED_NETWORKS ?= 127.0.0.1/32
# Finished days are aggregated and delivered to export destinations within two minutes, not 20.
run: export USAGE_AGGREGATE_EVERY_SECONDS ?= 60
run: export USAGE_EXPORT_EVERY_SECONDS ?= 60
run: venv
	$(BIN)/python manage.py migrate --noinput
	@$(BIN)/python manage.py seed_demo
	$(BIN)/python manage.py runstack

test: venv
	CI=$(CI) bash .ci/test.sh $(T)

# Proxy benchmark: direct vs through the gateway at C = 1, 16, 64 (figures in docs/benchmarks.md).
bench: venv
	bash .ci/with-services.sh $(BIN)/python -m tests.bench.proxy_bench $(BENCH_ARGS)
	bash .ci/with-services.sh $(BIN)/python -m tests.bench.quota_bench
	bash .ci/with-services.sh $(BIN)/python -m tests.bench.health_bench
	bash .ci/with-services.sh $(BIN)/python -m usage.bench
	bash .ci/with-services.sh $(BIN)/python -m usage.export_bench

# Usage export benchmark: 1,000,000 events of one day delivered to files and to ClickHouse (time, peak RSS).
bench-exports: venv
	bash .ci/with-services.sh $(BIN)/python -m usage.export_bench

# Usage-reporting benchmark: 1,000,000 events over 30 days on PostgreSQL.
bench-usage: venv
	bash .ci/with-services.sh $(BIN)/python -m usage.bench

# Health-check benchmark: 1,000 servers checked in one sweep (target: within the 60 s interval).
bench-health: venv
	bash .ci/with-services.sh $(BIN)/python -m tests.bench.health_bench

lint: venv
	$(BIN)/ruff check .

clean:
	rm -rf var .coverage htmlcov
