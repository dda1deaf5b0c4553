# calq's image: the CLI, the workers and Flower. EXTRAS=gpu,fleet adds JAX's CUDA build.
FROM python:3.11-slim
WORKDIR /app
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
COPY pyproject.toml README.md ./
COPY shared shared
COPY producer producer
COPY worker worker
ARG EXTRAS=fleet
RUN pip install ".[${EXTRAS}]"
ENTRYPOINT ["calq"]
CMD ["--help"]
