# The two commands a fresh machine needs: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install check test demo lint-policies clean protos fuzz soak bench locust

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	# xds-protos ships a stale copy of opentelemetry/proto that breaks the OTLP exporters
	# (grpc/grpc#42926); put the real opentelemetry-proto files back over it.
	$(BIN)/python -m pip install -q --force-reinstall --no-deps \
		"opentelemetry-proto==$$($(BIN)/python -c 'import importlib.metadata as m; print(m.version("opentelemetry-proto"))')"
	touch $@

install: $(STAMP)

check: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy --strict extauthz
	$(BIN)/extauthz policy lint --strict policies/
	$(BIN)/extauthz policy test policies/

test: check
	$(BIN)/pytest -q

demo: install
	$(BIN)/extauthz demo

# 10 minutes at a fixed rate past every cache bound: RSS and open files at start and end.
soak: install
	$(BIN)/python -m loadtest.soak --seconds 600 --rate 400 --json soak.json

# Envoy alone, Envoy RBAC + jwt_authn and Envoy + extauthz (1 and 2 workers), interleaved
# rounds of wrk through one Envoy each: a table, loadtest/results/bench.{json,png}.
# BENCH_ARGS: e.g. "--seconds 5 --rounds 2" or "--peer /usr/local/bin/opa" (OPA-Envoy).
BENCH_ARGS ?=
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
bench: install
	command -v wrk >/dev/null && command -v h2load >/dev/null || \
		{ $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q wrk nghttp2-client; }
	$(BIN)/python -m loadtest.bench $(BENCH_ARGS)

# locust --headless against extauthz (gRPC Check) and through a real Envoy (HTTP).
LOCUST_SECONDS ?= 30
locust: install
	$(BIN)/python -m loadtest.locust_run --seconds $(LOCUST_SECONDS)

# Coverage-guided fuzzing with atheris (CI runs the same targets with a mutation fuzzer:
# tests/test_fuzz.py). FUZZ_SECONDS per target; a crash stops with the input saved.
FUZZ_SECONDS ?= 300
fuzz: install
	$(BIN)/python -m pip install -q 'atheris>=3'
	for target in check token xfcc; do \
		$(BIN)/python -m extauthz.devtools.fuzz $$target -max_total_time=$(FUZZ_SECONDS) || exit 1; \
	done

# Regenerate extauthz/{admin,decisionlog}/v1/*_pb2*.py(i) from protos/ (tests/test_admin.py and
# tests/test_decision_log.py check they match). The decision log has no service: no _grpc module.
PROTOS := protos/extauthz/admin/v1/admin.proto
MESSAGE_PROTOS := protos/extauthz/decisionlog/v1/decision_log.proto
protos: install
	$(BIN)/python -m grpc_tools.protoc -Iprotos --python_out=. --pyi_out=. --grpc_python_out=. $(PROTOS)
	$(BIN)/python -m grpc_tools.protoc -Iprotos --python_out=. --pyi_out=. $(MESSAGE_PROTOS)

clean:
	rm -rf $(VENV) .demo .mypy_cache .ruff_cache .pytest_cache
