# spanagg container image: docker build -t spanagg:0.1.0 .
# Build stage: the release binary, from the locked dependency set.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
# Cargo reads every declared target when it loads the manifest, so benches come along.
COPY src ./src
COPY benches ./benches
RUN cargo build --release --locked --bin spanagg \
 && mkdir -p /out/data \
 && cp target/release/spanagg /out/spanagg

# Runtime: glibc and libgcc only (distroless), no shell, a non-root user (65532, "nonroot").
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/spanagg /usr/local/bin/spanagg
# The state directory (WAL, checkpoints), owned by the runtime user; mount a volume here.
COPY --from=build --chown=65532:65532 /out/data /data
USER 65532:65532
VOLUME ["/data"]
# OTLP/gRPC, OTLP/HTTP, HTTP (/metrics, /internal/metrics, /api/v1/*, /-/healthy, /-/ready).
EXPOSE 4317 4318 9464
ENTRYPOINT ["/usr/local/bin/spanagg"]
# Built-in defaults listen on loopback only; in a container listen on every interface. A config
# file (`serve --config ...`, as the Kubernetes manifest passes) replaces these arguments.
CMD ["serve", "--data-dir", "/data", "--grpc-listen", "0.0.0.0:4317", "--otlp-http-listen", "0.0.0.0:4318", "--http-listen", "0.0.0.0:9464"]
