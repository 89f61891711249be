# Builds Tally's programs on Debian 12 (the same packages as `make deps`), then a slim runtime image
# (curl for the compose health checks on /readyz).
FROM debian:12 AS build
WORKDIR /src
COPY scripts/install-deps scripts/install-deps
RUN scripts/install-deps
COPY . .
RUN make -j"$(nproc)" all

FROM debian:12-slim
RUN apt-get update && apt-get install -y --no-install-recommends \
        librdkafka1 libpq5 libavro23 libev4 libuuid1 libjansson4 libhttp-parser2.9 libssl3 \
        curl ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/build/bin/ /usr/local/bin/
USER nobody
ENTRYPOINT ["/usr/local/bin/tallyctl"]
