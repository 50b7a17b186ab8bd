# Container images of blockmesh, one stage each (build one with --target; scripts/build-images.sh builds and tags
# all three as the manifests name them, ghcr.io/blockmesh/<stage>:<workspace version>):
#   blockmesh           the node daemon (`blockmesh serve`), which the operator's server pods run
#   blockmesh-operator  the Kubernetes operator (operator/deploy/)
#   blockmesh-csi       the CSI driver, controller and node plugin (csi/deploy/), with the file-system tools it runs
# Nothing here has been built on the machines the project is developed on: they have a docker client but no engine.

FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p blockmesh -p blockmesh-operator -p blockmesh-csi \
    && install -m 0755 target/release/blockmesh target/release/blockmesh-operator target/release/blockmesh-csi \
       /usr/local/bin/

FROM debian:bookworm-slim AS runtime
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*

# The daemon: runs as root in its pod (it opens a pool file on a host path or a PVC and listens on 32607 and 10809).
FROM runtime AS blockmesh
COPY --from=build /usr/local/bin/blockmesh /usr/local/bin/blockmesh
EXPOSE 10809 32607
ENTRYPOINT ["blockmesh"]
CMD ["serve"]

# The operator talks only to the Kubernetes API: no root needed.
FROM runtime AS blockmesh-operator
COPY --from=build /usr/local/bin/blockmesh-operator /usr/local/bin/blockmesh-operator
USER 65532:65532
ENTRYPOINT ["blockmesh-operator"]

# The CSI driver's node plugin formats, mounts and grows file systems (blkid, mkfs.*, mount, resize2fs,
# xfs_growfs) and attaches NBD devices over netlink (privileged in its DaemonSet).
FROM runtime AS blockmesh-csi
RUN apt-get update \
    && apt-get install -y --no-install-recommends e2fsprogs xfsprogs util-linux mount \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /usr/local/bin/blockmesh-csi /usr/local/bin/blockmesh-csi
ENTRYPOINT ["blockmesh-csi"]
