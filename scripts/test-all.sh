#!/usr/bin/env bash
# Runs the whole test suite of the workspace: format, lints, every test.
# Installs the Debian packages the tests drive (real NBD clients and servers) when they are missing.
# Under CI=true a test that needs one of these tools fails when it is missing; it never skips.
set -euo pipefail
cd "$(dirname "$0")/.."

# command:package pairs for the third-party tools the tests run for real.
tools=(fio:fio nbdkit:nbdkit nbdinfo:libnbd-bin nbdcopy:libnbd-bin nbdsh:python3-libnbd
       qemu-io:qemu-utils qemu-img:qemu-utils qemu-nbd:qemu-utils ip:iproute2 tc:iproute2)
missing=()
for pair in "${tools[@]}"; do
  command -v "${pair%%:*}" >/dev/null 2>&1 || missing+=("${pair#*:}")
done
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "installing missing packages: $(printf '%s\n' "${missing[@]}" | sort -u | tr '\n' ' ')"
  $sudo apt-get update -qq
  # shellcheck disable=SC2046
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
    $(printf '%s\n' "${missing[@]}" | sort -u) >/dev/null
fi
# The operator's manifests are validated offline against the official Kubernetes schemas (PyPI kubernetes-validate).
if ! command -v kubernetes-validate >/dev/null 2>&1; then
  echo "installing kubernetes-validate (pip)"
  python3 -m pip install -q kubernetes-validate 2>/dev/null \
    || python3 -m pip install -q --break-system-packages kubernetes-validate
fi

cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
# The CSI driver's tests run the daemon binary this build makes (instead of building it again with their own
# feature set).
BLOCKMESH_BIN="$PWD/target/debug/blockmesh" cargo test --workspace
# The fuzz targets live outside the workspace (cargo-fuzz); make sure they still build against the libraries.
cargo fmt --manifest-path fuzz/Cargo.toml -- --check
cargo check --manifest-path fuzz/Cargo.toml
