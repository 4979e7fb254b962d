# modeld: serve MLflow models from a registry, as a standalone server or a sidecar.
#   docker build -t modeld .
#   docker run -p 8080:8080 -e MLFLOW_TRACKING_URI=http://mlflow:5000 modeld serve \
#       --host 0.0.0.0 -m models:/iris/Production
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    MODELD_CACHE_DIR=/var/cache/modeld

WORKDIR /opt/modeld
COPY pyproject.toml README.md ./
COPY loader ./loader
COPY serving ./serving
RUN pip install . \
    && useradd --system --uid 10001 --home-dir /nonexistent --shell /usr/sbin/nologin modeld \
    && mkdir -p /var/cache/modeld /etc/modeld \
    && chown -R modeld /var/cache/modeld

USER 10001
EXPOSE 8080
VOLUME ["/var/cache/modeld"]

# Liveness: the process answers. (Readiness, in Kubernetes: /v2/health/ready.)
HEALTHCHECK --interval=15s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request, sys; urllib.request.urlopen('http://127.0.0.1:8080/v2/health/live', timeout=2); sys.exit(0)"]

ENTRYPOINT ["modeld"]
CMD ["serve", "--config", "/etc/modeld/config.toml"]
