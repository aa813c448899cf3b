# The extauthz image: `docker build -t extauthz .` (docker-compose.yml builds it as extauthz:dev).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY pyproject.toml README.md ./
COPY extauthz ./extauthz
# xds-protos ships a stale copy of opentelemetry/proto over opentelemetry-proto's files,
# which breaks the OTLP exporters (grpc/grpc#42926): reinstall the real ones, as `make` does.
RUN pip install . \
    && pip install --force-reinstall --no-deps \
        "opentelemetry-proto==$(python -c 'import importlib.metadata as m; print(m.version("opentelemetry-proto"))')" \
    && rm -rf /src

RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin extauthz
USER 10001
WORKDIR /

EXPOSE 9191
# grpc.health.v1 on the check port, as the Kubernetes probes ask: SERVING once the policies
# are loaded, NOT_SERVING while draining. Keep the port equal to CMD's --listen.
HEALTHCHECK --interval=5s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-m", "extauthz.healthcheck", "127.0.0.1:9191"]
ENTRYPOINT ["extauthz"]
# Fails closed: without policies mounted here the server refuses to start.
CMD ["serve", "--listen", "0.0.0.0:9191", "--policies", "/etc/extauthz/policies"]
