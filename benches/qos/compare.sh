#!/usr/bin/env bash
# Noisy neighbour (issue #11): a noisy volume at full speed (fio 64 KiB random writes, queue depth 32) next to a
# quiet one at queue depth 1, both on one daemon and pool; the quiet volume's p99 latency with the NBD server's fair
# queue on (the daemon's default) against the same run with it off (`serve --fair-slots 0`). The quiet workload is
# run twice: 4 KiB random writes and 4 KiB random reads (the reads of a pre-written volume, through the page cache).
#
# Usage: benches/qos/compare.sh [SECONDS]   (default 10 s per run). Needs fio (with its nbd engine).
set -euo pipefail
cd "$(dirname "$0")/../.."
secs=${1:-10}
command -v fio >/dev/null || { echo "fio is missing: apt-get install fio" >&2; exit 1; }
cargo build -q --release -p blockmesh
bin=target/release/blockmesh
work=$(mktemp -d)
out="$work/results.jsonl"
pid=
stop() { [ -z "$pid" ] || { kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; pid=; }; }
trap 'stop; rm -rf "$work"' EXIT
settle() { sync; [ "$(id -u)" -ne 0 ] || echo 3 > /proc/sys/vm/drop_caches || true; }

start() { # fair-slots
  settle
  rm -rf "$work/data"
  "$bin" serve --data-dir "$work/data" --pool-size 8G --nbd-listen 127.0.0.1:0 --api-listen 127.0.0.1:0 \
      --fair-slots "$1" > "$work/serve.out" 2>/dev/null & pid=$!
  for _ in $(seq 300); do grep -q "blockmesh serving" "$work/serve.out" 2>/dev/null && break; sleep 0.05; done
  api=$(sed -n 's/.*control API at \([^ ]*\).*/\1/p' "$work/serve.out")
  sock="$work/data/nbd.sock"
  export BLOCKMESH_SERVER="$api" BLOCKMESH_DATA_DIR="$work/data"
  "$bin" init noisy --size 2G >/dev/null
  "$bin" init quiet --size 1G >/dev/null
  # the quiet volume holds data, so its reads are reads of blocks, not of holes
  fio --name=fill --ioengine=nbd --uri="nbd+unix:///admin/quiet?socket=$sock" --rw=write --bs=1M --iodepth=8 \
      --size=1G >/dev/null
}

run() { # mode quiet-rw
  local noisy_json="$work/noisy.json" quiet_json="$work/quiet.json"
  fio --name=noisy --ioengine=nbd --uri="nbd+unix:///admin/noisy?socket=$sock" --rw=randwrite --bs=64k \
      --iodepth=32 --size=2G --time_based --runtime="$secs" --output-format=json > "$noisy_json" 2>/dev/null &
  local npid=$!
  sleep 1
  fio --name=quiet --ioengine=nbd --uri="nbd+unix:///admin/quiet?socket=$sock" --rw="$2" --bs=4k --iodepth=1 \
      --size=1G --time_based --runtime=$((secs - 2)) --output-format=json > "$quiet_json" 2>/dev/null
  wait "$npid"
  python3 - "$1" "$2" "$noisy_json" "$quiet_json" >> "$out" <<'PY'
import json, sys
mode, rw, nf, qf = sys.argv[1:5]
def job(f, k):
    t = open(f).read()
    return json.loads(t[t.index('{'):])['jobs'][0][k]
n = job(nf, 'write')
q = job(qf, 'write' if 'write' in rw else 'read')
p = q['clat_ns']['percentile']
print(json.dumps({'mode': mode, 'quiet': rw, 'p99_us': p['99.000000'] / 1e3, 'p50_us': p['50.000000'] / 1e3,
                  'quiet_iops': q['iops'], 'noisy_mbps': n['bw_bytes'] / 1e6}))
PY
}

for mode in on off; do
  start "$([ "$mode" = on ] && echo 8 || echo 0)"
  run "$mode" randwrite
  run "$mode" randread
  stop
done

commit=$(git rev-parse --short HEAD)
python3 - "$out" "$secs" "$commit" <<'PY'
import json, sys, datetime
rows = [json.loads(l) for l in open(sys.argv[1])]
secs, commit = sys.argv[2], sys.argv[3]
by = {(r['mode'], r['quiet']): r for r in rows}
lines = ["## Noisy neighbour: fairness between volumes (issue #11)", "",
         f"Command: `benches/qos/compare.sh {secs}` ({datetime.date.today()}, commit {commit}, 2 cores). One daemon, "
         "one 8 GiB pool file; the noisy volume runs fio 64 KiB random writes at queue depth 32 for the whole run, "
         f"the quiet volume fio 4 KiB requests at queue depth 1 for {int(secs) - 2} s inside it; both over the Unix "
         "socket (`--ioengine=nbd`). Fairness on: `serve` defaults (`--fair-slots 8`); off: `--fair-slots 0`.", "",
         "| quiet workload | quiet p99 fair on | quiet p99 fair off | **p99 on / off** | quiet p50 on / off | "
         "quiet IOPS on / off | noisy MB/s on / off |",
         "|---|---|---|---|---|---|---|"]
for rw in ["randwrite", "randread"]:
    a, b = by[('on', rw)], by[('off', rw)]
    lines.append(f"| 4K {rw} qd1 | {a['p99_us']:.0f} us | {b['p99_us']:.0f} us | **{a['p99_us'] / b['p99_us']:.2f}x** | "
                 f"{a['p50_us']:.0f} / {b['p50_us']:.0f} us | {a['quiet_iops']:.0f} / {b['quiet_iops']:.0f} | "
                 f"{a['noisy_mbps']:.0f} / {b['noisy_mbps']:.0f} |")
lines.append("")
sys.path.insert(0, "benches")
from results import write_section
write_section("qos", "\n".join(lines))
PY
