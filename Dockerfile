# syntax=docker/dockerfile:1
# The operator image, for building with Docker / BuildKit elsewhere:
#   docker build -t workerpool-operator:dev .
# Same content as the image hack/images.sh builds without Docker for the local cluster: the
# static `workerpool` binary (glibc, crt-static) at /workerpool, run as user 65532, nothing else.
# The binary needs no CA bundle or other files: in a cluster it uses the service account's CA.

ARG RUST_VERSION=1.95
FROM rust:${RUST_VERSION}-bookworm AS build
# set by BuildKit from --platform; amd64 and arm64 are supported
ARG TARGETARCH=amd64
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    case "$TARGETARCH" in \
      amd64) target=x86_64-unknown-linux-gnu ;; \
      arm64) target=aarch64-unknown-linux-gnu ;; \
      *) echo "unsupported TARGETARCH $TARGETARCH" >&2; exit 1 ;; \
    esac \
 && RUSTFLAGS='-C target-feature=+crt-static' \
    cargo build --release --locked --target "$target" --bin workerpool \
 && cp "target/$target/release/workerpool" /workerpool \
 && if readelf -l /workerpool | grep -q 'program interpreter'; then echo "not static" >&2; exit 1; fi

FROM scratch
COPY --from=build /workerpool /workerpool
USER 65532:65532
ENTRYPOINT ["/workerpool"]
