# syntax=docker/dockerfile:1
# cmc-forwarder container image.
#
#   docker build -t cmc-forwarder .
#   docker run --rm -p 8080:8080 -p 127.0.0.1:9091:9091 \
#     -e CMC_FORWARDER__NATS__SERVERS=nats://nats.example:4222 \
#     -e CMC_FORWARDER__AUTH__API_KEY=... -v cmc-spool:/var/lib/cmc-forwarder cmc-forwarder
#
# Ports: 8080 webhook (POST /webhooks/cmc), 9091 admin (GET /healthz, GET /readyz).
# Config: /etc/cmc-forwarder/config.toml (config/default.toml; mount another file over it or
# set CMC_FORWARDER_CONFIG), every key overridable by CMC_FORWARDER__SECTION__KEY.
# Needs BuildKit (the default builder since Docker 23) for the cache mounts below.

# The builder and the runtime share one Debian release, so the binary's glibc matches.
ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=bookworm

FROM rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS builder
WORKDIR /build
# Everything the manifest names (library, binary, examples, tests) must exist for cargo to
# read it; .dockerignore keeps target/, .tools/ and .git/ out of the context.
COPY . .
# Cache mounts keep the registry and compiled dependencies between builds, so a source change
# rebuilds only this crate. The binary is copied out because the target cache mount is not
# part of the image.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/build/target \
    cargo build --release --locked --bin cmc-forwarder \
    && install -D -m 0755 target/release/cmc-forwarder /out/cmc-forwarder

FROM debian:${DEBIAN_RELEASE}-slim
# TLS to NATS verifies against the system roots; taking the bundle from the builder avoids an
# apt layer (and its unpinned package versions) in the runtime image.
COPY --from=builder /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
COPY --from=builder /out/cmc-forwarder /usr/local/bin/cmc-forwarder
COPY config/default.toml /etc/cmc-forwarder/config.toml

# A fixed numeric user, so Kubernetes' runAsNonRoot can check it and volume ownership is
# predictable (fsGroup 10001 in deploy/kubernetes).
RUN groupadd --system --gid 10001 cmc \
    && useradd --system --uid 10001 --gid cmc --home-dir /var/lib/cmc-forwarder \
       --no-create-home --shell /usr/sbin/nologin cmc \
    && install -d -o cmc -g cmc -m 0750 /var/lib/cmc-forwarder /var/lib/cmc-forwarder/spool

ENV CMC_FORWARDER_CONFIG=/etc/cmc-forwarder/config.toml
# mimalloc commits memory on demand: about 24 MB resident under load instead of 36 MB.
ENV MIMALLOC_ARENA_EAGER_COMMIT=0
# Inside a container 127.0.0.1 is the container's own loopback: kubelet probes and Docker's
# published ports come from outside the container's network namespace and could not reach a
# loopback-only admin listener. Publish 9091 on the host's loopback only
# (-p 127.0.0.1:9091:9091) and never through a public Service or load balancer.
ENV CMC_FORWARDER__ADMIN__LISTEN=0.0.0.0:9091
# The spool must live in the volume, the only place that is writable (also under a read-only
# root filesystem) and survives the container: pinned here over whatever a mounted
# configuration says.
ENV CMC_FORWARDER__SPOOL__DIR=/var/lib/cmc-forwarder/spool

WORKDIR /var/lib/cmc-forwarder
VOLUME ["/var/lib/cmc-forwarder"]
USER 10001:10001
EXPOSE 8080 9091

# Liveness only (/healthz): a container that cannot reach NATS is still healthy (it spools or
# answers 503, and says so on /readyz); restarting it would not bring NATS back. Plain bash,
# because the image has no curl.
HEALTHCHECK --interval=15s --timeout=3s --start-period=15s --retries=3 \
  CMD ["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/9091 && printf 'GET /healthz HTTP/1.0\\r\\n\\r\\n' >&3 && read -r _ code _ <&3 && [ \"$code\" = 200 ]"]

# SIGTERM (docker stop, Kubernetes) turns /readyz to 503, stops accepting, gives in-flight
# requests server.shutdown_grace (10 s by default), then flushes the spool writer and NATS.
# docker stop waits only 10 s before SIGKILL: give it more (docker run --stop-timeout 20,
# Compose stop_grace_period: 20s).
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/cmc-forwarder"]
