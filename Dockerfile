# calq's image: the CLI, the workers and Flower. EXTRAS=gpu,fleet adds JAX's CUDA build.
# Pinned base; everything runs as the unprivileged user calq (uid 10001), never root.
FROM python:3.11.10-slim
WORKDIR /app
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
COPY pyproject.toml README.md ./
COPY shared shared
COPY producer producer
COPY worker worker
ARG EXTRAS=fleet
RUN pip install ".[${EXTRAS}]" \
    && useradd --create-home --uid 10001 --user-group calq \
    && mkdir -p /cache \
    && chown calq:calq /cache
USER calq
ENTRYPOINT ["calq"]
CMD ["--help"]
