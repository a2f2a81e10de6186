# syntax=docker/dockerfile:1
# regcache container image.
#
#   docker build --build-arg REGCACHE_GIT_COMMIT=$(git rev-parse --short HEAD) -t regcache .
#   docker run -d --name regcache -p 5000:5000 -p 9090:9090 -v regcache-data:/var/lib/regcache regcache
#
# Configure it with REGCACHE_* environment variables or a mounted file (docs/docker.md,
# docs/configuration.md).
#
# Runtime base: distroless cc, not scratch. The binary is a glibc binary (the default
# x86_64/aarch64-unknown-linux-gnu target): a static musl build would run the hot path on
# musl's allocator, which is much slower than glibc's under many threads, and BENCHMARKS.md is
# measured on glibc. distroless/cc-debian12 is scratch plus exactly what that needs (glibc,
# libgcc_s), CA certificates, /etc/passwd with the `nonroot` user (65532) and /tmp, with no
# shell or package manager. The builder is bookworm so that the glibc the binary was linked
# against (2.36) is the one the runtime has.

ARG RUST_IMAGE=rust:1.95-bookworm
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot

FROM ${RUST_IMAGE} AS builder
WORKDIR /src
# build.rs takes the commit from here (.git is not in the build context).
ARG REGCACHE_GIT_COMMIT=unknown
COPY . .
# The caches keep the registry and compiled dependencies between builds; the binary is copied
# out of the cache mount because the mount is not part of the stage's file system.
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked --bin regcache \
 && install -D -m 0755 target/release/regcache /out/regcache \
 && install -d -m 0700 -o 65532 -g 65532 /out/data

FROM ${RUNTIME_IMAGE}
ARG REGCACHE_GIT_COMMIT=unknown
LABEL org.opencontainers.image.title="regcache" \
      org.opencontainers.image.description="A caching pull-through proxy for container registries" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.revision="${REGCACHE_GIT_COMMIT}"
COPY --from=builder /out/regcache /usr/local/bin/regcache
# Owned by the runtime user so a new named volume mounted here starts out writable.
COPY --from=builder --chown=65532:65532 /out/data /var/lib/regcache
# The embedded default config listens on loopback and keeps data in ./regcache-data; a
# container needs all interfaces and the volume. Every other key keeps its default.
ENV REGCACHE_LISTEN=0.0.0.0:5000 \
    REGCACHE_METRICS_LISTEN=0.0.0.0:9090 \
    REGCACHE_DATA_DIR=/var/lib/regcache
USER 65532:65532
VOLUME /var/lib/regcache
# 5000: registry API (+ /metrics, /healthz, /readyz); 9090: /metrics, /healthz, /readyz only.
EXPOSE 5000 9090
# No shell or curl here: the binary checks itself. `regcache health` asks /healthz on the
# configured `metrics_listen` (plain HTTP even when `listen` has TLS on), else on `listen`;
# 0.0.0.0 is reached on 127.0.0.1, so it follows a changed port.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["/usr/local/bin/regcache", "health"]
ENTRYPOINT ["/usr/local/bin/regcache"]
CMD ["serve"]
