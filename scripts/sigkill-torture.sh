#!/usr/bin/env bash
# SIGKILL torture, long version: the real daemon (release build) under NBD load with flushes, FUA writes and commits,
# killed with SIGKILL at random moments (some during its start-up), restarted, and every block read back. Prints the
# kills done, the flushed writes verified and the writes lost (must be 0). CI runs a short version as part of
# `cargo test` (cli/tests/sigkill_torture.rs, 20 kills).
#
#   scripts/sigkill-torture.sh [kills]         # default 200
#   TORTURE_SEED=S scripts/sigkill-torture.sh  # replay a seed's workload (printed at the start and on failure)
set -euo pipefail
cd "$(dirname "$0")/.."

kills="${1:-200}"
case "$kills" in
  '' | *[!0-9]*) echo "usage: $0 [kills]" >&2; exit 2 ;;
esac

cargo test --release -p blockmesh --test sigkill_torture --no-run
# The test prints the seed, then "sigkill torture: K kills, W writes verified, 0 writes lost" and the details (with the
# run's own duration); it fails, keeping the data directory, on any lost or torn write.
TORTURE_KILLS="$kills" cargo test --release -q -p blockmesh --test sigkill_torture -- --nocapture
echo "(release build of commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD 2>/dev/null || echo ' with local changes'))"
