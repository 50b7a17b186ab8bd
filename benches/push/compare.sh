#!/usr/bin/env bash
# Push between daemons (issue #7): two real `blockmesh serve` daemons on loopback, the second a remote of the first.
#  (a) full push of a 1 GiB dot written whole with random data, next to nbdcopy of that export from daemon A to a
#      fresh 1 GiB dot on daemon B;
#  (b) a 10 GiB dot with 1 GiB of random data (pushed once, not measured), then 1 MiB and 100 MiB changed (scattered
#      4 KiB blocks of random data at distinct random offsets over the whole volume) + commit + incremental push,
#      next to nbdcopy of the whole 10 GiB volume (a commit export) from A to a fresh 10 GiB dot on B.
# Bytes on the wire are the stream bytes of `push -o json`; times are push's own (its JSON "seconds", receiver's
# flush included) and nbdcopy's wall time with --flush. Each measured step runs ROUNDS times (the change steps on
# new random blocks each round); the table gives medians. Writes the figures into benches/RESULTS.md (section "push").
# Usage: benches/push/compare.sh [ROUNDS, default 3]
set -euo pipefail
cd "$(dirname "$0")/../.."
rounds=${1:-3}
root=$PWD
work=${BENCH_DIR:-$PWD/target/bench-work}/push
for tool in nbdcopy nbdsh python3; do
  command -v "$tool" > /dev/null || { echo "$tool is needed (apt-get install libnbd-bin python3-libnbd)" >&2; exit 1; }
done
cargo build --release -q -p blockmesh
bm=$root/target/release/blockmesh
rm -rf "$work"
mkdir -p "$work"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2> /dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2> /dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

# start_daemon NAME: serve NAME's data dir on free ports (port 0: the daemon prints the ones it got)
start_daemon() {
  local name=$1 dir=$work/$1
  mkdir -p "$dir"
  "$bm" serve --data-dir "$dir" --pool-size 24G --nbd-listen 127.0.0.1:0 --api-listen 127.0.0.1:0 \
    > "$dir/serve.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 600); do
    if grep -q '^blockmesh serving' "$dir/serve.log"; then break; fi
    kill -0 "${pids[-1]}" 2> /dev/null || { cat "$dir/serve.log" >&2; exit 1; }
    sleep 0.1
  done
  local line
  line=$(grep '^blockmesh serving' "$dir/serve.log") || { echo "daemon $name did not start" >&2; exit 1; }
  declare -g "nbd_$name=$(sed -E 's|.*nbd://([^ ]+) and.*|\1|' <<< "$line")"
  declare -g "api_$name=$(sed -E 's|.*control API at (http://[^ ]+).*|\1|' <<< "$line")"
}
start_daemon a
start_daemon b
export BLOCKMESH_CONFIG=$work/remotes.json
# client of daemon NAME
on() {
  local name=$1
  shift
  local api=api_$name
  env -u BLOCKMESH_API_KEY -u BLOCKMESH_REMOTE BLOCKMESH_SERVER="${!api}" BLOCKMESH_DATA_DIR="$work/$name" "$bm" "$@"
}
on a remote add b "$api_b" --key-file "$work/b/api-key" > /dev/null
echo "daemons: A nbd://$nbd_a $api_a, B nbd://$nbd_b $api_b" >&2

now() { date +%s.%N; }
# nbdcopy with a flush at the end (as a receive flushes); prints its wall time in seconds
timed_nbdcopy() {
  local t0 t1
  t0=$(now)
  nbdcopy --flush "$1" "$2"
  t1=$(now)
  python3 -c "print($t1 - $t0)"
}
commit_id() { on a commit "$1" -m "$2" -o json | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])'; }
# scattered DOT N SEED: N random 4 KiB blocks of random data at distinct random 4K-aligned offsets of A's DOT
scattered() {
  URI="nbd://$nbd_a/admin/$1" N=$2 SEED=$3 PATH=/usr/bin:$PATH nbdsh -c '
import os, random
h.connect_uri(os.environ["URI"])
rng = random.Random(int(os.environ["SEED"]))
for b in rng.sample(range(h.get_size() // 4096), int(os.environ["N"])):
    h.pwrite(rng.randbytes(4096), b * 4096)
h.flush()
'
}
out=$work/figures.txt
: > "$out"
load=$(cut -d' ' -f1-3 /proc/loadavg)

echo "writing 1 GiB of random data" >&2
head -c 1G /dev/urandom > "$work/random.img"
on a init full --size 1G > /dev/null
nbdcopy --flush "$work/random.img" "nbd://$nbd_a/admin/full"
c_full=$(commit_id full "1 GiB of random data")
on a init big --size 10G > /dev/null
nbdcopy --flush "$work/random.img" "nbd://$nbd_a/admin/big"
rm -f "$work/random.img"
commit_id big "1 GiB of random data" > /dev/null
echo "first push of the 10 GiB dot (not measured)" >&2
on a push b big -o json > "$work/push-big0.json"

for r in $(seq "$rounds"); do
  # (a) full push of 1 GiB vs nbdcopy of the same export (B's copies deleted after each round)
  echo "round $r/$rounds: full push of 1 GiB" >&2
  on a push b full -o json > "$work/push-full-$r.json"
  on b delete full --yes > /dev/null
  on b init copy1g --size 1G > /dev/null
  echo "round $r/$rounds: nbdcopy of the 1 GiB export" >&2
  echo "nbdcopy_1g $(timed_nbdcopy "nbd://$nbd_a/admin/full@$c_full" "nbd://$nbd_b/admin/copy1g")" >> "$out"
  on b delete copy1g --yes > /dev/null
  # (b) 1 MiB, then 100 MiB changed in the 10 GiB dot, each committed and pushed; nbdcopy of the whole volume
  scattered big 256 "$((r * 10 + 1))"
  commit_id big "1 MiB changed" > /dev/null
  echo "round $r/$rounds: incremental push of 1 MiB changed" >&2
  on a push b big -o json > "$work/push-1m-$r.json"
  scattered big 25600 "$((r * 10 + 2))"
  c_big=$(commit_id big "100 MiB changed")
  echo "round $r/$rounds: incremental push of 100 MiB changed" >&2
  on a push b big -o json > "$work/push-100m-$r.json"
  on b init copy10g --size 10G > /dev/null
  echo "round $r/$rounds: nbdcopy of the whole 10 GiB export" >&2
  echo "nbdcopy_10g $(timed_nbdcopy "nbd://$nbd_a/admin/big@$c_big" "nbd://$nbd_b/admin/copy10g")" >> "$out"
  on b delete copy10g --yes > /dev/null
  # the receiver has the same commit as the sender
  test "$(on b log big -o json | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["id"])')" = "$c_big"
done

python3 - "$work" "$rounds" "$load" <<'PY'
import json, sys, datetime, statistics, subprocess
sys.path.insert(0, "benches")
from results import write_section
work, rounds, load = sys.argv[1], int(sys.argv[2]), sys.argv[3]
nbdcopy = {}
for l in open(f"{work}/figures.txt"):
    k, v = l.split()
    nbdcopy.setdefault(k, []).append(float(v))
load_json = lambda n: json.load(open(f"{work}/push-{n}.json"))
runs = {n: [load_json(f"{n}-{r}") for r in range(1, rounds + 1)] for n in ("full", "1m", "100m")}
big0 = load_json("big0")
git = lambda *a: subprocess.run(["git", *a], capture_output=True, text=True).stdout.strip()
commit = git("rev-parse", "--short", "HEAD")
if git("status", "--porcelain", "--", "cli", "engine", "nbd-server"):
    commit += " + uncommitted changes"
med = statistics.median
spread = lambda xs: f"{min(xs):.3f}-{max(xs):.3f}"
MiB = 1 << 20
rows = [("full push, 1 GiB dot written whole (first push)", "full", 1 << 30, "nbdcopy_1g", "1 GiB"),
        ("incremental push, 1 MiB changed (256 scattered 4 KiB blocks) in the 10 GiB dot", "1m", MiB, "nbdcopy_10g",
         "10 GiB"),
        ("incremental push, 100 MiB changed (25,600 scattered 4 KiB blocks) in the 10 GiB dot", "100m", 100 * MiB,
         "nbdcopy_10g", "10 GiB")]
lines = ["## Push between daemons (issue #7)", "",
         f"Command: `benches/push/compare.sh {rounds}` ({datetime.date.today()}, commit {commit}, 2 cores, load "
         f"average {load} at the start, two daemons on loopback, each on its own sparse 24 GiB pool file in the "
         f"same directory, through the page cache). Medians of {rounds} rounds (range in brackets). Bytes on the "
         "wire: the stream bytes `push -o json` counts (daemon A sends them to daemon B itself; the client only asks A "
         "and shows progress); push time: its own (`seconds`: the log queries, the stream "
         "and the receiver's flush). The anchor is `nbdcopy --flush` of the whole volume (a commit export of "
         "daemon A) to a fresh dot of the same size on daemon B, in the same round; nbdcopy reads the allocation "
         "map and skips holes (it sends zero requests for them), so for the 10 GiB volume it copies the 1.1-1.3 GiB "
         "written, not 10 GiB. Changed blocks hold random data at distinct random offsets over the whole volume "
         "(new ones each round); the 1 GiB dot goes whole each round (B's copy is deleted in between).", "",
         "| what | bytes changed | bytes on the wire | on the wire / changed | push time, s | nbdcopy of the whole volume, s | push / nbdcopy |",
         "|---|---:|---:|---:|---:|---:|---:|"]
for name, key, changed, anchor, vol in rows:
    rs = runs[key]
    assert all(len(r["commits"]) == 1 for r in rs), rs
    by, secs, nb = med([r["bytes"] for r in rs]), [r["seconds"] for r in rs], nbdcopy[anchor]
    lines.append(f"| {name} | {changed:,} | {by:,.0f} | **{by / changed:.3f}x** | {med(secs):.3f} ({spread(secs)}) "
                 f"| {med(nb):.3f} ({spread(nb)}; {vol}) | **{med(secs) / med(nb):.3f}x** |")
full_rate = med([r["bytes"] / r["seconds"] for r in runs["full"]]) / 1e6
lines += ["", f"Not measured, for reference: the first push of the 10 GiB dot (1 GiB of data, whole) sent "
          f"{big0['bytes']:,} bytes in {big0['seconds']:.2f} s. The full push's rate: {full_rate:.0f} MB/s of "
          f"stream; nbdcopy's: {(1 << 30) / med(nbdcopy['nbdcopy_1g']) / 1e6:.0f} MB/s."]
write_section("push", "\n".join(lines))
PY
