# One image for the flow (`nudgeflow run`, the default) and the dispatch API
# (`nudgeflow dispatch-api ...`); see docker-compose.yml. Configured only through
# NUDGEFLOW_* environment variables (nudgeflow/core/settings.py).
#
# The base is pinned to a patch release; bump it deliberately (and consider
# pinning its digest too: python:3.11.13-slim-bookworm@sha256:...).
FROM python:3.11.13-slim-bookworm AS build

# The wheel's detection is compiled with mypyc (setup.py): about twice as fast per
# event. The compiler stays in this stage; the image below gets only the wheel.
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /build
# README* matches nothing until there is a README; pyproject.toml keeps the COPY valid.
COPY pyproject.toml setup.py README* ./
COPY nudgeflow ./nudgeflow
RUN NUDGEFLOW_MYPYC=1 pip wheel --no-cache-dir --no-deps -w /wheels .

FROM python:3.11.13-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# A fixed numeric id, so that `runAsNonRoot` checks can see it is not root.
RUN groupadd --system --gid 10001 nudgeflow \
    && useradd --system --uid 10001 --gid nudgeflow --create-home --shell /usr/sbin/nologin nudgeflow

# Only the installed package stays in the image, not the wheel it came from.
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl \
    && rm -rf /wheels

# The default rules and templates are package data inside the installed package;
# mount your own rules file and point NUDGEFLOW_RULES at it to change them.
WORKDIR /app

USER 10001:10001
ENTRYPOINT ["nudgeflow"]
CMD ["run"]
