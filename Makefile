# The two commands a fresh machine needs: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install debs check test demo compose lint-policies clean protos fuzz soak bench locust

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

# Debian packages the tests and benchmarks use, installed when missing (command:package):
# curl for the README's demo examples, wrk and h2load for loadtest.bench.
DEBS := curl:curl wrk:wrk h2load:nghttp2-client
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
debs:
	@missing=""; for pair in $(DEBS); do \
		command -v $${pair%%:*} >/dev/null || missing="$$missing $${pair#*:}"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:$$missing"; \
		$(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q $$missing; fi

check: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy --strict extauthz
	$(BIN)/extauthz policy lint --strict policies/
	$(BIN)/extauthz policy test policies/

test: check debs
	$(BIN)/pytest -q

demo: install
	$(BIN)/extauthz demo

# The demo mesh in containers: generate what docker-compose.yml mounts (certificates, IdP
# keys, sidecar and collector configs) with the demo's code, then `docker compose up --build`.
compose: install
	$(BIN)/python -m extauthz.devtools.compose .demo/compose

# 10 minutes at a fixed rate past every cache bound: RSS and open files at start and end.
soak: install
	$(BIN)/python -m loadtest.soak --seconds 600 --rate 400 --json soak.json

# Envoy alone, Envoy RBAC + jwt_authn and Envoy + extauthz (1 and 2 workers), interleaved
# rounds of wrk through one Envoy each: a table, loadtest/results/bench.{json,png}.
# BENCH_ARGS: e.g. "--seconds 5 --rounds 2" or "--peer /usr/local/bin/opa" (OPA-Envoy).
BENCH_ARGS ?=
bench: install debs
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
