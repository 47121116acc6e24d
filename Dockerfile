# One image for the flow (`nudgeflow run`, the default) and the dispatch API
# (`nudgeflow dispatch-api ...`); see docker-compose.yml. Configured only through
# NUDGEFLOW_* environment variables (nudgeflow/settings.py).
#
# The base is pinned to a patch release; bump it deliberately (and consider
# pinning its digest too: python:3.11.13-slim-bookworm@sha256:...).
FROM python:3.11.13-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# A fixed numeric id, so that `runAsNonRoot` checks can see it is not root.
RUN groupadd --system --gid 10001 nudgeflow \
    && useradd --system --uid 10001 --gid nudgeflow --create-home --shell /usr/sbin/nologin nudgeflow

# Build and install from a scratch directory that is removed afterwards: only the
# installed package and the rules stay in the image.
WORKDIR /build
# README* matches nothing until there is a README; pyproject.toml keeps the COPY valid.
COPY pyproject.toml README* ./
COPY nudgeflow ./nudgeflow
COPY flows ./flows
COPY operators ./operators
COPY sinks ./sinks
RUN pip install --no-cache-dir . \
    && rm -rf /build

WORKDIR /app
COPY config ./config
# The default rules path is relative to the source tree, which the image does not have.
ENV NUDGEFLOW_RULES=/app/config/rules.yaml

USER 10001:10001
ENTRYPOINT ["nudgeflow"]
CMD ["run"]
