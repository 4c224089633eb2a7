# syntax=docker/dockerfile:1
# tollgate, built in one stage and run from a slim image in the next.
#   docker build -t tollgate .

FROM rust:1.95.0-slim-bookworm AS build
WORKDIR /src
COPY . .
# The caches keep the registry and the build between image builds.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin tollgate \
    && cp target/release/tollgate /usr/local/bin/tollgate

FROM debian:bookworm-slim AS runtime
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /var/lib/tollgate tollgate \
    && mkdir -p /var/lib/tollgate/journal /etc/tollgate \
    && chown -R tollgate /var/lib/tollgate
COPY --from=build /usr/local/bin/tollgate /usr/local/bin/tollgate
COPY config/prices.toml /etc/tollgate/prices.toml
# The working directory holds the default SQLite ledger and the journal; mount
# a volume here so that neither is lost with the container.
WORKDIR /var/lib/tollgate
ENV TOLLGATE__PRICES__FILE=/etc/tollgate/prices.toml \
    TOLLGATE__LEDGER__JOURNAL_DIR=/var/lib/tollgate/journal
USER tollgate
EXPOSE 8080 9464
VOLUME ["/var/lib/tollgate"]
# SIGTERM starts a graceful shutdown: in-flight requests finish, the ledger flushes.
STOPSIGNAL SIGTERM
ENTRYPOINT ["tollgate"]
CMD ["serve"]
