# poolport: an Erlang node with the poolport OTP application, Python and the
# handler modules in one image (`poolport serve` runs as a child of the VM).
#
#   docker build --network host -t poolport:latest .
#   docker compose up                  # see docker-compose.yml and docs/deploy.md
#
# BASE_IMAGE must be Debian bookworm (or compatible): Erlang/OTP, rebar3 and
# Python all come from its apt sources. Where no image registry is reachable,
# make a local base first (tests/container/smoke.sh does it with debootstrap +
# docker import) and pass --build-arg BASE_IMAGE=<that tag>.
#
# If TLS to the Python package index is intercepted by a proxy with its own CA,
# put that CA bundle (PEM) in the build context as pip-ca-bundle.pem: only the
# build stage's pip uses it, it does not reach the final image.
ARG BASE_IMAGE=debian:bookworm-slim

# ---------------------------------------------------------------------------
# Build stage: rebar3 and erlang-dev (and what they pull in) stay here.
FROM ${BASE_IMAGE} AS build
ENV DEBIAN_FRONTEND=noninteractive LANG=C.UTF-8 LC_ALL=C.UTF-8
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
        erlang-nox erlang-dev rebar3 python3 python3-venv ca-certificates \
        gcc python3-dev \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/poolport

# Python side: poolport and its dependencies in a virtualenv.
COPY pyproject.toml setup.py README.md LICENSE pip-ca-bundle.pe[m] ./
COPY poolport/ poolport/
RUN python3 -m venv /opt/venv \
 && if [ -s pip-ca-bundle.pem ]; then export PIP_CERT="$PWD/pip-ca-bundle.pem"; fi \
 && /opt/venv/bin/pip install --no-cache-dir --disable-pip-version-check . \
 && rm -rf build poolport poolport.egg-info pip-ca-bundle.pem pyproject.toml \
 && cd / && /opt/venv/bin/python -c "import poolport, loky, msgspec, yaml, poolport.codec.etf as e; assert e.ACCELERATED, 'C codec not built'"

# Erlang side: the poolport OTP application. It has no dependencies, so
# rebar3 never talks to a package registry.
COPY erlang/ erlang/
RUN cd erlang && rm -rf _build && rebar3 compile \
 && test -f _build/default/lib/poolport/ebin/poolport.app

# Node glue (pool and app nodes, probe, entrypoint).
COPY deploy/ deploy/
RUN mkdir -p deploy/ebin && erlc -o deploy/ebin deploy/*.erl \
 && chmod 0755 deploy/entrypoint.sh

# Handler modules and the default configuration (docker-compose.yml mounts
# config/poolport.yaml over this copy, so the pool size changes without a rebuild).
COPY examples/ examples/
COPY config/ config/

# ---------------------------------------------------------------------------
# Runtime stage: Erlang/OTP, Python and tini (PID 1: forwards SIGTERM to the
# VM, reaps orphans).
FROM ${BASE_IMAGE}
ENV DEBIAN_FRONTEND=noninteractive LANG=C.UTF-8 LC_ALL=C.UTF-8
RUN apt-get update \
 && apt-get install -y --no-install-recommends erlang-nox python3 tini \
 && rm -rf /var/lib/apt/lists/*

COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/poolport /opt/poolport
RUN ln -s /opt/poolport/deploy/entrypoint.sh /usr/local/bin/poolport-node \
 && /opt/venv/bin/python -m poolport check --config /opt/poolport/config/poolport.yaml >/dev/null

# Non-root runtime user. The Erlang cookie is NOT in the image: the entrypoint
# writes ~/.erlang.cookie at start from POOLPORT_COOKIE, POOLPORT_COOKIE_FILE,
# /run/secrets/poolport_cookie, or a random cookie it makes in the volume
# mounted at /var/lib/poolport/cookie (shared by the nodes of a deployment).
RUN useradd --system --uid 10001 --user-group --home-dir /var/lib/poolport \
        --create-home --shell /usr/sbin/nologin poolport \
 && install -d -o poolport -g poolport -m 0700 /var/lib/poolport/cookie

ENV PATH=/opt/venv/bin:$PATH \
    POOLPORT_HOME=/opt/poolport
USER poolport
WORKDIR /var/lib/poolport

ENTRYPOINT ["/usr/bin/tini", "--", "/opt/poolport/deploy/entrypoint.sh"]
CMD ["pool"]
