#!/usr/bin/env bash
# NBD servers side by side in one run on the same disk (issue #4's benchmark), all driven by fio's nbd ioengine
# (libnbd) over a Unix socket:
# (fio's nbd engine prints a line before its JSON, which the parser skips.)
#   blockmesh: an engine volume in a sparse pool file (buffered), served by nbd-bench-server (the daemon's code path)
#   qemu-nbd serving a raw file, qemu-nbd serving qcow2 (both with the default writeback cache)
#   nbdkit's file plugin on a raw file
# Workloads: 1M sequential write and read at iodepth 4, 4K random write and read at iodepth 16, over a 1 GiB export
# (the sequential write fills it first, so reads read data). Ratios are against qemu-nbd raw and nbdkit measured in
# the same run; the table goes into benches/RESULTS.md.
# This machine's speed moves by up to 2x between runs a minute apart (one server's 1M writes measured 353 and 1,877 MB/s
# in two runs), so the servers take turns in rounds: each round runs every server once, and the table compares the
# medians over the rounds (with each round's own ratio to nbdkit beside them); the order rotates from round to round.
# Usage: benches/nbd/compare.sh [seconds per run, default 10] [rounds, default 3]
set -euo pipefail
cd "$(dirname "$0")/../.."
secs=${1:-10}
rounds=${2:-3}
work=${BENCH_DIR:-$PWD/target/bench-work}/nbd
rm -rf "$work"
mkdir -p "$work"
for t in fio qemu-nbd qemu-img nbdkit; do
  command -v "$t" >/dev/null || { echo "$t is missing: apt-get install fio qemu-utils nbdkit" >&2; exit 1; }
done
cargo build --release -q -p blockmesh-benches --bin nbd-bench-server
out="$work/results.jsonl"
: > "$out"
sock="$work/nbd.sock"
pid=

stop() { if [ -n "$pid" ]; then kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; pid=; fi; rm -f "$sock"; }
trap stop EXIT
wait_socket() { for _ in $(seq 200); do [ -S "$sock" ] && return 0; sleep 0.05; done; echo "server did not start" >&2; exit 1; }

fio_run() { # who uri name rw bs iodepth (and $round)
  fio --name="$3" --ioengine=nbd --uri="$2" --rw="$4" --bs="$5" --iodepth="$6" --size=1G \
      --time_based --runtime="$secs" --output-format=json 2>"$work/fio.err" |
    python3 -c "
import json,sys
t=sys.stdin.read(); j=json.loads(t[t.index('{'):])['jobs'][0]; k='write' if 'write' in '$4' else 'read'
print(json.dumps({'round':$round,'who':'$1','workload':'$3','iops':j[k]['iops'],'mbps':j[k]['bw_bytes']/1e6,
                  'lat_us':j[k]['clat_ns']['mean']/1e3}))" >> "$out"
}
# Each server starts from a synced and (as root) dropped page cache, so none inherits another's cached or dirty pages.
settle() { sync; [ "$(id -u)" -ne 0 ] || echo 3 > /proc/sys/vm/drop_caches || true; }
suite() { # who uri
  settle
  fio_run "$1" "$2" "1M seq write qd4" write 1M 4
  fio_run "$1" "$2" "1M seq read qd4" read 1M 4
  fio_run "$1" "$2" "4K rand write qd16" randwrite 4k 16
  fio_run "$1" "$2" "4K rand read qd16" randread 4k 16
}

server_blockmesh() {
  # its pool statistics, printed when it stops, go to a log beside the results
  target/release/nbd-bench-server "$work/pool.bm" "$sock" --pool-gib 32 --volume-mib 1024 \
    2>> "$work/blockmesh-server.log" & pid=$!
  wait_socket
  suite blockmesh "nbd+unix:///bench?socket=$sock"
  stop
  rm -f "$work/pool.bm"
}
server_qemu_raw() {
  truncate -s 1G "$work/disk.raw"
  qemu-nbd -t -f raw -k "$sock" -x bench --discard=unmap "$work/disk.raw" & pid=$!
  wait_socket
  suite "qemu-nbd raw" "nbd+unix:///bench?socket=$sock"
  stop
  rm -f "$work/disk.raw"
}
server_qemu_qcow2() {
  qemu-img create -q -f qcow2 "$work/disk.qcow2" 1G
  qemu-nbd -t -f qcow2 -k "$sock" -x bench --discard=unmap "$work/disk.qcow2" & pid=$!
  wait_socket
  suite "qemu-nbd qcow2" "nbd+unix:///bench?socket=$sock"
  stop
  rm -f "$work/disk.qcow2"
}
server_nbdkit() {
  truncate -s 1G "$work/disk.raw"
  nbdkit -f -U "$sock" -e bench file "$work/disk.raw" & pid=$!
  wait_socket
  suite "nbdkit file" "nbd+unix:///bench?socket=$sock"
  stop
  rm -f "$work/disk.raw"
}
# The disk itself, as an anchor for the sequential rows: fio straight to a file with O_DIRECT (no page cache, no NBD).
# A log-structured store writes all it is given to the disk within a checkpoint interval (a checkpoint must find the
# data it points at on disk), while the other servers overwrite the file in place in the page cache and write nothing
# back during a run of a few seconds.
disk_anchor() {
  settle
  for rw in write read; do
    fio --name=disk --ioengine=libaio --direct=1 --filename="$work/disk.direct" --rw="$rw" --bs=1M --iodepth=4 \
        --size=1G --time_based --runtime="$secs" --output-format=json 2>"$work/fio.err" |
      python3 -c "
import json,sys
j=json.load(sys.stdin)['jobs'][0]; k='$rw'
print(json.dumps({'round':$round,'who':'disk O_DIRECT','workload':'1M seq '+k+' qd4','iops':j[k]['iops'],
                  'mbps':j[k]['bw_bytes']/1e6,'lat_us':j[k]['clat_ns']['mean']/1e3}))" >> "$out"
  done
  # The same writes through the page cache with an fdatasync every 128 MiB (blockmesh's background log sync,
  # BACKGROUND_SYNC_LOG_BYTES): what the disk takes when what is written must reach it about as often.
  fio --name=disk --ioengine=io_uring --filename="$work/disk.direct" --rw=write --bs=1M --iodepth=4 --fdatasync=128 \
      --size=1G --time_based --runtime="$secs" --output-format=json 2>"$work/fio.err" |
    python3 -c "
import json,sys
j=json.load(sys.stdin)['jobs'][0]
print(json.dumps({'round':$round,'who':'disk synced','workload':'1M seq write qd4','iops':j['write']['iops'],
                  'mbps':j['write']['bw_bytes']/1e6,'lat_us':j['write']['clat_ns']['mean']/1e3}))" >> "$out"
  rm -f "$work/disk.direct"
}
# The order rotates from round to round, so no server always runs first (on a machine just settled) or last.
servers=(server_blockmesh server_qemu_raw server_qemu_qcow2 server_nbdkit disk_anchor)
for round in $(seq "$rounds"); do
  for i in 0 1 2 3 4; do
    "${servers[$(( (i + round - 1) % 5 ))]}"
  done
done

commit=$(git rev-parse --short HEAD)
python3 - "$out" "$secs" "$commit" "$rounds" <<'PY'
import json, re, sys, datetime, statistics
rows = [json.loads(l) for l in open(sys.argv[1])]
secs, commit, rounds = sys.argv[2], sys.argv[3], int(sys.argv[4])
def median_row(rs):
    return {k: statistics.median(r[k] for r in rs) for k in ("iops", "mbps", "lat_us")}
by = {}
for key in {(r["who"], r["workload"]) for r in rows}:
    by[key] = median_row([r for r in rows if (r["who"], r["workload"]) == key])
per_round = {(r["round"], r["who"], r["workload"]): r for r in rows}
workloads = ["4K rand write qd16", "4K rand read qd16", "1M seq write qd4", "1M seq read qd4"]
servers = ["blockmesh", "qemu-nbd raw", "qemu-nbd qcow2", "nbdkit file"]
def fig(r, w):
    return f"{r['mbps']:.0f} MB/s" if w.startswith("1M") else f"{r['iops']:.0f} IOPS"
lines = ["## NBD servers side by side (issue #4)", "",
         f"Command: `benches/nbd/compare.sh {secs} {rounds}` ({datetime.date.today()}, commit {commit}, 2 cores, ext4 "
         f"on one virtual disk). fio {secs} s per run, `--ioengine=nbd` (libnbd) over a Unix socket, 1 GiB export "
         "filled by the sequential write first; every server on a file in the same directory, through the page "
         f"cache. {rounds} rounds, each running every server in turn (the order rotating from round to round); "
         "figures are medians over the rounds, ratios "
         "are of the medians, and the last column gives each round's own ratio to nbdkit. The disk column is fio "
         "with O_DIRECT straight to a file in the same directory (no NBD, no page cache): blockmesh writes all it is "
         "given to the disk within a checkpoint interval (a checkpoint must find the data it points at on disk), "
         "while qemu-nbd and nbdkit overwrite the 1 GiB file in place in the page cache and write nothing back "
         "during a run. The disk synced column is fio writing 1 MiB blocks at queue depth 4 through the page cache to a "
         "1 GiB file with an fdatasync every 128 MiB (as often as blockmesh's background log sync): what the disk "
         "takes when the data must reach it.", "",
         "| workload | " + " | ".join(servers) + " | disk O_DIRECT | disk synced | blockmesh / qemu-nbd raw | blockmesh / nbdkit | blockmesh / disk | blockmesh / disk synced | target | per round / nbdkit |",
         "|---|" + "---|" * (len(servers) + 8)]
for w in workloads:
    b = by[("blockmesh", w)]
    q = by[("qemu-nbd raw", w)]
    k = by[("nbdkit file", w)]
    target = ">= 1.2x qemu-nbd raw, >= 1.0x nbdkit" if w.startswith("4K") else ">= 1.0x qemu-nbd raw, >= 1.0x nbdkit"
    cells = [fig(by[(s, w)], w) for s in servers]
    each = ", ".join(f"{per_round[(n, 'blockmesh', w)]['iops'] / per_round[(n, 'nbdkit file', w)]['iops']:.2f}x"
                     for n in range(1, rounds + 1))
    d = by.get(("disk O_DIRECT", w))
    disk = fig(d, w) if d else "-"
    vs_disk = f"{b['iops']/d['iops']:.2f}x" if d else "-"
    ds = by.get(("disk synced", w))
    synced = fig(ds, w) if ds else "-"
    vs_synced = f"{b['iops']/ds['iops']:.2f}x" if ds else "-"
    lines.append(f"| {w} | " + " | ".join(cells) + f" | {disk} | {synced} | **{b['iops']/q['iops']:.2f}x** | **{b['iops']/k['iops']:.2f}x** | {vs_disk} | {vs_synced} | {target} | {each} |")
lines.append("")
lines.append("Mean completion latency (us, median over the rounds): " + "; ".join(
    f"{w}: " + ", ".join(f"{s} {by[(s, w)]['lat_us']:.0f}" for s in servers) for w in workloads) + ".")
lines.append("")
section = "\n".join(lines)
sys.path.insert(0, "benches")
from results import write_section
write_section("nbd", section)
PY
