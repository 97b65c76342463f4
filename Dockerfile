# modelpress service image.
#   docker build -t modelpress .
#   docker run -p 8080:8080 -v modelpress-data:/data modelpress

# --- build -------------------------------------------------------------------
FROM rust:1-slim-bookworm AS build
WORKDIR /src
# Dependencies first, so that a change to the sources alone reuses this layer.
COPY Cargo.toml Cargo.lock ./
RUN mkdir -p src benches \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs \
    && echo 'fn main() {}' > benches/kernels.rs \
    && cargo build --release --locked --bin modelpress \
    && rm -rf src benches
COPY src ./src
COPY migrations ./migrations
COPY benches ./benches
# The placeholder build left newer artifacts of the crate itself: touch the
# real sources so they are rebuilt.
RUN touch src/main.rs src/lib.rs \
    && cargo build --release --locked --bin modelpress \
    && strip target/release/modelpress

# --- run ---------------------------------------------------------------------
FROM debian:bookworm-slim AS runtime
# CA certificates for webhooks to https URLs; curl for the health check.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /data --shell /usr/sbin/nologin modelpress \
    && mkdir -p /data \
    && chown modelpress:modelpress /data
COPY --from=build /src/target/release/modelpress /usr/local/bin/modelpress
USER modelpress
ENV MODELPRESS_ADDR=0.0.0.0:8080 \
    MODELPRESS_DATA_DIR=/data \
    MODELPRESS_LOG_FORMAT=json
VOLUME ["/data"]
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD curl -fsS http://127.0.0.1:8080/healthz || exit 1
STOPSIGNAL SIGTERM
ENTRYPOINT ["modelpress"]
CMD ["serve"]
