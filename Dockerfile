# iotgw in a container: `docker build -t iotgw .` then
# `docker run -p 1883:1883 -p 8080:8080 -p 5683:5683/udp -v iotgw-data:/var/lib/iotgw iotgw`.
# Settings are IOTGW_* environment variables (`-e IOTGW_KAFKA=kafka:9092`), see README.
# Stage 1 compiles the Cython codecs; the image keeps only the installed venv.
FROM python:3.11-slim-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY gateway gateway
COPY shadow shadow
COPY loadtest loadtest
RUN python -m venv /opt/iotgw && /opt/iotgw/bin/pip install --no-cache-dir . \
    && /opt/iotgw/bin/iotgw selfcheck

FROM python:3.11-slim-bookworm
RUN useradd --system --uid 10001 --home-dir /var/lib/iotgw --shell /usr/sbin/nologin iotgw \
    && mkdir -p /var/lib/iotgw && chown iotgw:iotgw /var/lib/iotgw
COPY --from=build /opt/iotgw /opt/iotgw
ENV PATH=/opt/iotgw/bin:$PATH \
    IOTGW_DATA_DIR=/var/lib/iotgw \
    IOTGW_BIND=0.0.0.0
VOLUME /var/lib/iotgw
USER iotgw
EXPOSE 1883 8883 8080 5683/udp
HEALTHCHECK --interval=10s --timeout=3s CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/readyz' % os.environ.get('IOTGW_HTTP_PORT', '8080'), timeout=2)"]
ENTRYPOINT ["iotgw"]
CMD ["run"]
