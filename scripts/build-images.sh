#!/usr/bin/env bash
# Builds the three container images of the Dockerfile and tags them as the manifests name them:
# ghcr.io/blockmesh/{blockmesh,blockmesh-operator,blockmesh-csi}:<workspace version> (REGISTRY overrides
# ghcr.io/blockmesh; PUSH=1 pushes them). Needs a running Docker engine (or podman with a docker alias).
set -euo pipefail
cd "$(dirname "$0")/.."
registry=${REGISTRY:-ghcr.io/blockmesh}
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
for target in blockmesh blockmesh-operator blockmesh-csi; do
  docker build --target "$target" -t "$registry/$target:$version" .
  if [ "${PUSH:-0}" = 1 ]; then docker push "$registry/$target:$version"; fi
done
echo "built $registry/{blockmesh,blockmesh-operator,blockmesh-csi}:$version"
