#!/usr/bin/env bash
# CPU per request of NBD servers: each server command in turn serves export `bench` on $SOCK (default
# target/bench-work/cpu/nbd.sock, passed to the command as SOCK in its text), a 1 GiB sequential fill, then one fio
# run; prints the throughput, the server process's CPU (utime + stime of all its threads, from /proc/PID/stat) per
# second and per GB or per request, fio's CPU and how busy the machine was.
# Usage: benches/nbd/cpu.sh RW BS IODEPTH SECS "label:server command" ...
#   benches/nbd/cpu.sh write 1M 4 10 "bm:target/release/nbd-bench-server POOL SOCK --pool-gib 32 --volume-mib 1024" \
#                                     "kit:nbdkit -f -U SOCK -e bench file RAW"
# POOL and RAW in a command become a fresh pool path and a fresh 1 GiB sparse raw file in the work directory.
set -euo pipefail
cd "$(dirname "$0")/../.."
[ $# -ge 5 ] || { sed -n 2,9p "$0" >&2; exit 2; }
rw=$1 bs=$2 qd=$3 secs=$4; shift 4
work=${BENCH_DIR:-$PWD/target/bench-work}/cpu
mkdir -p "$work"
sock="$work/nbd.sock"
for spec in "$@"; do
  label=${spec%%:*}; cmd=${spec#*:}
  rm -f "$work/pool.bm" "$work/raw.img" "$sock"
  truncate -s 1G "$work/raw.img"
  cmd=${cmd//SOCK/$sock}; cmd=${cmd//POOL/$work/pool.bm}; cmd=${cmd//RAW/$work/raw.img}
  $cmd > "$work/server.log" 2>&1 & pid=$!
  for _ in $(seq 100); do [ -S "$sock" ] && break; sleep 0.1; done
  [ -S "$sock" ] || { echo "$label: the server did not start (see $work/server.log)" >&2; kill $pid 2>/dev/null; exit 1; }
  uri="nbd+unix:///bench?socket=$sock"
  fio --name=fill --ioengine=nbd --uri="$uri" --rw=write --bs=1M --iodepth=4 --size=1G > /dev/null 2>&1
  t0=$(awk '{print $14 + $15}' /proc/$pid/stat); s0=$(head -1 /proc/stat)
  out=$(fio --name=run --ioengine=nbd --uri="$uri" --rw="$rw" --bs="$bs" --iodepth="$qd" --size=1G --time_based \
        --runtime="$secs" --output-format=json 2>/dev/null | sed -n '/^{/,$p')
  t1=$(awk '{print $14 + $15}' /proc/$pid/stat); s1=$(head -1 /proc/stat)
  kill $pid; wait $pid 2>/dev/null || true
  echo "$out" | python3 -c '
import json, os, sys
label, t0, t1, s0, s1 = sys.argv[1:6]
j = json.load(sys.stdin)["jobs"][0]
d = j["write"] if j["write"]["io_bytes"] > 0 else j["read"]
secs = j["job_runtime"] / 1000
hz = os.sysconf("SC_CLK_TCK")
server = (float(t1) - float(t0)) / hz / secs
a = [int(x) for x in s0.split()[1:]]; b = [int(x) for x in s1.split()[1:]]
delta = [y - x for x, y in zip(a, b)]; cores = os.cpu_count()
busy = (sum(delta) - delta[3] - delta[4]) / sum(delta) * cores
fio = (j["usr_cpu"] + j["sys_cpu"]) / 100
mb = d["bw_bytes"] / 1e6
print("%s: %.0f MB/s, %.0f IOPS; server %.2f cores = %.2f core-s/GB = %.1f us/request; fio %.2f cores; busy %.2f of %d cores"
      % (label, mb, d["iops"], server, server / mb * 1000, server / d["iops"] * 1e6, fio, busy, cores))
' "$label" "$t0" "$t1" "$s0" "$s1"
done
