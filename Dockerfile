# CPU image running prefixgate's main job. A plain mirror of the README's set-up (scripts/setup.sh).
FROM python:3.11-slim
WORKDIR /app
COPY . /app
RUN ./scripts/setup.sh
ENV PATH=/app/.venv/bin:$PATH
EXPOSE 8080
# Inside a container the gateway must listen beyond loopback for the port mapping to reach it.
CMD ["prefixgate", "serve", "--host", "0.0.0.0", "--port", "8080"]
