# The automat image: one image for the Ray head, the mail-worker nodes and the driver.
#   docker build -t registry.example.invalid/automat:0.1.0 .
# Ray (with dashboard + Serve) and every dependency come pinned from pyproject.toml.
# No secrets in the image: AUTOMAT_* settings and /run/secrets/* are given at run time
# (deploy/k8s/configmap.yaml, secret.example.yaml; ray-cluster.yaml's docker run_options).
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    RAY_USAGE_STATS_ENABLED=0 \
    AUTOMAT_LOCAL_STACK=false \
    AUTOMAT_RUN_DIR=/data/run

# wget/procps: KubeRay's health probes and `ray stop`; tini reaps Ray's child processes
RUN apt-get update \
 && apt-get install -y --no-install-recommends wget procps tini ca-certificates \
 && rm -rf /var/lib/apt/lists/*

RUN groupadd --gid 1000 ray && useradd --uid 1000 --gid 1000 --create-home --shell /bin/bash ray

WORKDIR /app
# dependencies first (cached layer), then the code
COPY pyproject.toml README.md ./
RUN mkdir -p actors supervisors protocols deploy \
 && touch actors/__init__.py supervisors/__init__.py protocols/__init__.py deploy/__init__.py \
 && pip install . && pip uninstall -y automat
COPY actors ./actors
COPY supervisors ./supervisors
COPY protocols ./protocols
COPY deploy ./deploy
RUN pip install --no-deps . \
 && mkdir -p /data/run /data/blobs && chown -R ray:ray /data

USER ray
ENV PYTHONPATH=/app
# 6379 GCS, 8265 dashboard, 10001 Ray client, 8080 metrics, 18000 HTTP ingress (EFA/MOPED)
EXPOSE 6379 8265 10001 8080 18000
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["automat", "--help"]
