#!/usr/bin/env bash
# Side by side, in one run on this machine: the same simulated fleet (QoS 1, ~100-byte JSON,
# mutual TLS with one certificate per device) through
#   1. Mosquitto (Debian package) with TLS and client certificates, as a plain relay to one
#      subscriber,
#   2. the same Mosquitto with no subscriber ("mosquitto-ingest": TLS, PUBLISH and PUBACK only,
#      the least work a broker can do per message),
#   3. rumqttd, the broker whose router sitegate embeds, standalone (crates.io: `cargo install
#      rumqttd --version 0.20.0 --features verify-client-cert`; set RUMQTTD to the binary, or
#      have it on PATH), MQTT 5 over mutual TLS, relaying to one subscriber, and
#   4. sitegate: policy on every packet, a filter rule, the encrypted durable spool, a file sink.
# For each: accepted messages/s, publish → PUBACK latency p50/p99, messages that reached the
# subscriber or the sink, CPU seconds, peak RSS and peak anonymous RSS (heap and stacks, without
# the program's file-backed code pages) of the broker process, the CPU the simulator itself
# used (what the load generator costs on the same two cores), and the ratios sitegate /
# Mosquitto (relay) and sitegate / Mosquitto (ingest). Prints a table and writes JSON.
#
# Usage: benches/compare.sh [DEVICES ...]          (default: 100 1000)
# Environment: DURATION seconds of publishing (15), RATE messages/s across the fleet (0: as fast
# as PUBACKs come back), INFLIGHT per device (16), OUT JSON file (target/compare.json), PEERS
# the brokers to run beside sitegate ("mosquitto mosquitto-ingest rumqttd"; empty for sitegate
# alone, to compare two sitegate builds or settings), SITEGATE_EXTRA TOML lines added to
# sitegate's configuration (for an A/B of one setting in one binary), STORM a number of devices
# to keep connected through a reconnect storm: after DURATION every other device loses its
# connection at once and reconnects, and a second table gives when all were back, handshakes/s,
# the kept devices' PUBACK p99 before and during, and the simulator's connection errors.
# Needs: mosquitto, mosquitto-clients, python3 (scripts/test installs them). Loopback only.
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-15}
RATE=${RATE:-0}
INFLIGHT=${INFLIGHT:-16}
OUT=${OUT:-${CARGO_TARGET_DIR:-target}/compare.json}
SIZES=("$@")
[ ${#SIZES[@]} -gt 0 ] || SIZES=(100 1000)

SCRIPT=compare.sh
# shellcheck source=benches/common.sh
. benches/common.sh
RUMQTTD=${RUMQTTD:-$(command -v rumqttd || true)}
[ -n "$RUMQTTD" ] || echo "compare.sh: rumqttd is not installed (see above); it is left out" >&2
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

# CPU seconds (user + system) and peak RSS (MiB) of a live process.
usage_of() {
  python3 - "$1" <<'PY'
import os, sys
pid = sys.argv[1]
fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
hwm = next(int(l.split()[1]) for l in open(f"/proc/{pid}/status") if l.startswith("VmHWM"))
print(f"{cpu:.2f} {hwm / 1024:.1f}")
PY
}

"$BIN" ca init --dir "$WORK/pki" --site compare >/dev/null
"$BIN" device issue compare-sub --ca "$WORK/pki" --out "$WORK/sub" >/dev/null

# Samples a process's anonymous RSS every 100 ms into FILE (KiB, the peak so far) until it exits.
sample_anon() { # PID FILE
  local peak=0 a
  while kill -0 "$1" 2>/dev/null; do
    a=$(awk '/^Anonymous:/{print $2}' "/proc/$1/smaps_rollup" 2>/dev/null || echo 0)
    [ -n "$a" ] && [ "$a" -gt "$peak" ] && peak=$a && echo "$peak" > "$2"
    sleep 0.1
  done
}

simulate() { # PORT DEVICES JSON [extra args]; the simulator's CPU seconds go to JSON.cpu
  local port=$1 devices=$2 json=$3; shift 3
  python3 - "$json.cpu" "$BIN" simulate --gateway "127.0.0.1:$port" --ca "$WORK/pki" --devices "$devices" \
    --rate "$RATE" --duration "$DURATION" --qos 1 --payload-bytes 100 --profile thermostat \
    --inflight "$INFLIGHT" --connect-rate 2000 --quiet --json "$json" ${STORM:+--storm --storm-keep "$STORM"} "$@" <<'PY' >/dev/null
import resource, subprocess, sys
code = subprocess.run(sys.argv[2:]).returncode
r = resource.getrusage(resource.RUSAGE_CHILDREN)
open(sys.argv[1], "w").write(f"{r.ru_utime + r.ru_stime:.2f}")
sys.exit(code)
PY
}

run_mosquitto() { # DEVICES NAME SUBSCRIBE(1/0)
  local n=$1 name=$2 subscribe=$3 port; port=$(free_port)
  { tls_listener "$port" "$WORK/pki"; printf 'max_connections -1\nmax_queued_messages 1000000\npersistence false\n'; } > "$WORK/mosquitto.conf"
  "$MOSQUITTO" -c "$WORK/mosquitto.conf" & local mpid=$!; PIDS+=("$mpid")
  sample_anon "$mpid" "$WORK/$name-$n.anon" & PIDS+=("$!")
  wait_port "$port"
  : > "$WORK/sub.out"
  local spid=
  if [ "$subscribe" = 1 ]; then
    mosquitto_sub -h 127.0.0.1 -p "$port" --cafile "$WORK/pki/ca.pem" --cert "$WORK/sub/compare-sub.pem" \
      --key "$WORK/sub/compare-sub.key" -i compare-sub -q 1 -t 'dt/#' > "$WORK/sub.out" & spid=$!; PIDS+=("$spid")
    sleep 0.5
  fi
  simulate "$port" "$n" "$WORK/$name-$n.json"
  sleep 2
  local usage; usage=$(usage_of "$mpid")
  # The subscriber first, while the broker can still take its DISCONNECT.
  if [ -n "$spid" ]; then kill "$spid" 2>/dev/null || true; sleep 0.5; kill -9 "$spid" 2>/dev/null || true; fi
  kill "$mpid"; wait $spid "$mpid" 2>/dev/null || true
  echo "$usage $(wc -l < "$WORK/sub.out") $(cat "$WORK/$name-$n.anon" 2>/dev/null || echo 0)" > "$WORK/$name-$n.usage"
}

run_rumqttd() { # DEVICES
  local n=$1 port; port=$(free_port)
  local dir="$WORK/rumqttd-$n"; mkdir -p "$dir"
  cat > "$dir/rumqttd.toml" <<EOF
id = 0
[router]
id = 0
max_connections = $(( n * 2 + 10 ))
max_outgoing_packet_count = 200
max_segment_size = 104857600
max_segment_count = 10

[v5.1]
name = "v5-1"
listen = "127.0.0.1:$port"
next_connection_delay_ms = 0
    [v5.1.tls]
    capath = "$WORK/pki/ca.pem"
    certpath = "$WORK/pki/gateway.pem"
    keypath = "$WORK/pki/gateway.key"
    [v5.1.connections]
    connection_timeout_ms = 60000
    max_payload_size = 20480
    max_inflight_count = 100
EOF
  "$RUMQTTD" -q -c "$dir/rumqttd.toml" > "$dir/rumqttd.log" 2>&1 & local rpid=$!; PIDS+=("$rpid")
  sample_anon "$rpid" "$WORK/rumqttd-$n.anon" & PIDS+=("$!")
  wait_port "$port"
  # rumqttd's rustls refuses an IP address as TLS server name, which mosquitto_sub sends for
  # 127.0.0.1; the gateway certificate names localhost too.
  mosquitto_sub -V mqttv5 -h localhost -p "$port" --cafile "$WORK/pki/ca.pem" --cert "$WORK/sub/compare-sub.pem" \
    --key "$WORK/sub/compare-sub.key" -i compare-sub -q 1 -t 'dt/#' > "$WORK/sub.out" & local spid=$!; PIDS+=("$spid")
  sleep 0.5
  simulate "$port" "$n" "$WORK/rumqttd-$n.json"
  sleep 2
  local usage; usage=$(usage_of "$rpid")
  kill "$spid" 2>/dev/null || true; sleep 0.5; kill -9 "$spid" 2>/dev/null || true
  kill "$rpid" 2>/dev/null || true; wait "$spid" "$rpid" 2>/dev/null || true
  echo "$usage $(wc -l < "$WORK/sub.out") $(cat "$WORK/rumqttd-$n.anon" 2>/dev/null || echo 0)" > "$WORK/rumqttd-$n.usage"
}

run_sitegate() { # DEVICES
  local n=$1 port; port=$(free_port)
  local dir="$WORK/sitegate-$n"; mkdir -p "$dir/rules"
  cat > "$dir/rules/readings.sql" <<'EOF'
-- Every reading with a temperature, with the device's identity.
INSERT INTO out
SELECT thing_name() AS thing, principal() AS cert_id, temp, humidity, seq
FROM 'dt/+/+'
WHERE NOT isUndefined(temp)
EOF
  cat > "$dir/sitegate.toml" <<EOF
site = "compare"
data_dir = "data"

[listener]
mqtts = "127.0.0.1:$port"
ca = "$WORK/pki/ca.pem"
cert = "$WORK/pki/gateway.pem"
key = "$WORK/pki/gateway.key"
max_connections = $(( n * 2 > 1000 ? n * 2 : 1000 ))
# The whole simulated fleet comes from one address, 127.0.0.1. A site's devices each have
# their own; the per-address share (32 by default) is there so that one host cannot take every
# handshake place.
max_pending_per_address = 256

[auth.device_groups.sim]
selection_rule = "thingName: sim-*"
policy = "telemetry"

[auth.policies.telemetry.connect]
operations = ["mqtt:connect"]
resources = ["mqtt:clientId:\${iot:Connection.Thing.ThingName}"]

[auth.policies.telemetry.publish]
operations = ["mqtt:publish"]
resources = ["mqtt:topic:dt/\${iot:Connection.Thing.ThingName}/#"]

[rules]
dir = "rules"

[sinks.out]
type = "file"
path = "out/readings.jsonl"
rotate_bytes = "4GiB"

[spool.encryption]
key_file = "$WORK/pki/spool.kek"
EOF
  [ -z "${SITEGATE_EXTRA:-}" ] || printf '%s\n' "$SITEGATE_EXTRA" >> "$dir/sitegate.toml"
  RUST_LOG=warn "$BIN" run --config "$dir/sitegate.toml" 2>"$dir/gateway.log" & local gpid=$!; PIDS+=("$gpid")
  sample_anon "$gpid" "$WORK/sitegate-$n.anon" & PIDS+=("$!")
  wait_port "$port"
  simulate "$port" "$n" "$WORK/sitegate-$n.json" --approve-as sim --config "$dir/sitegate.toml"
  # Wait for the spool to drain into the sink (bounded).
  for _ in $(seq 100); do
    "$BIN" spool status --config "$dir/sitegate.toml" --json 2>/dev/null \
      | python3 -c 'import json,sys; sys.exit(0 if sum(q["records"] for q in json.load(sys.stdin)["queues"]) == 0 else 1)' && break
    sleep 0.1
  done
  local usage; usage=$(usage_of "$gpid")
  kill "$gpid"; wait "$gpid" 2>/dev/null || true
  echo "$usage $(cat "$dir"/out/readings.jsonl* 2>/dev/null | wc -l) $(cat "$WORK/sitegate-$n.anon" 2>/dev/null || echo 0)" > "$WORK/sitegate-$n.usage"
}

for n in "${SIZES[@]}"; do
  echo "compare.sh: $n devices, ${DURATION}s, rate ${RATE} (0 = as fast as acknowledged)" >&2
  for peer in ${PEERS-mosquitto mosquitto-ingest rumqttd}; do
    case $peer in
      mosquitto) run_mosquitto "$n" mosquitto 1 ;;
      mosquitto-ingest) run_mosquitto "$n" mosquitto-ingest 0 ;;
      rumqttd) [ -z "$RUMQTTD" ] || run_rumqttd "$n" ;;
      *) echo "compare.sh: unknown peer '$peer' in PEERS" >&2; exit 2 ;;
    esac
  done
  run_sitegate "$n"
done

python3 - "$WORK" "$OUT" "${SIZES[@]}" <<'PY'
import json, os, platform, sys, time
work, out, sizes = sys.argv[1], sys.argv[2], sys.argv[3:]
BROKERS = [b for b in ("mosquitto", "mosquitto-ingest", "rumqttd", "sitegate")
           if os.path.exists(f"{work}/{b}-{sizes[0]}.usage")]
cpu_model = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.machine())
machine = f"{os.cpu_count()} cores, {cpu_model}, {platform.system()} {platform.release()}"
runs = []
for n in sizes:
    row = {"devices": int(n)}
    for broker in BROKERS:
        s = json.load(open(f"{work}/{broker}-{n}.json"))
        cpu, rss, delivered, anon = open(f"{work}/{broker}-{n}.usage").read().split()
        sim_cpu = float(open(f"{work}/{broker}-{n}.json.cpu").read())
        row[broker] = {
            "connected": s["connected"], "rate": round(s["rate"]), "acknowledged": s["acknowledged"],
            "delivered": int(delivered), "p50_ms": s["latency"]["p50_ms"], "p99_ms": s["latency"]["p99_ms"],
            "cpu_s": float(cpu), "peak_rss_mib": float(rss),
            "peak_anon_mib": round(int(anon) / 1024, 1),
            "cpu_us_per_msg": round(float(cpu) * 1e6 / max(s["acknowledged"], 1), 1),
            "simulator_cpu_s": sim_cpu,
            "simulator_cpu_us_per_msg": round(sim_cpu * 1e6 / max(s["acknowledged"], 1), 1),
            "simulator_errors": s["errors"],
        }
        if s.get("storm"):
            st = s["storm"]
            row[broker]["storm"] = {
                "dropped": st["dropped"], "reconnected": st["reconnected"],
                "all_back_s": round(st["all_back_s"], 2), "handshakes_per_s": round(st["handshakes_per_s"]),
                "kept_p99_before_ms": st["kept_before"]["p99_ms"], "kept_p99_during_ms": st["kept_during"]["p99_ms"],
            }
    g = row["sitegate"]
    if g["delivered"] == 0:
        # A refused rule or route acknowledges at once and stores nothing: not a comparison.
        sys.exit(f"compare.sh: sitegate delivered nothing at {n} devices; its rule or sink did not load (see gateway.log)")
    for peer, key in (("mosquitto", "ratio"), ("mosquitto-ingest", "ratio_ingest"), ("rumqttd", "ratio_rumqttd")):
        if peer not in row:
            continue
        m = row[peer]
        row[key] = {k: round(g[k] / m[k], 2) if m[k] else None
                    for k in ("rate", "p50_ms", "p99_ms", "cpu_us_per_msg", "peak_rss_mib", "peak_anon_mib")}
    runs.append(row)
result = {"machine": machine, "date": time.strftime("%Y-%m-%d"), "runs": runs}
os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
json.dump(result, open(out, "w"), indent=2)
print(f"machine: {machine}")
print("| devices | broker | msg/s | p50 ms | p99 ms | delivered | CPU µs/msg | peak RSS MiB | peak anon MiB | simulator CPU µs/msg |")
print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
for r in runs:
    for b in BROKERS:
        x = r[b]
        print(f"| {r['devices']} | {b} | {x['rate']} | {x['p50_ms']:.2f} | {x['p99_ms']:.2f} | {x['delivered']} | {x['cpu_us_per_msg']} | {x['peak_rss_mib']} | {x['peak_anon_mib']} | {x['simulator_cpu_us_per_msg']} |")
    for key, peer in (("ratio", "mosquitto"), ("ratio_ingest", "mosquitto-ingest"), ("ratio_rumqttd", "rumqttd")):
        if key not in r:
            continue
        q = r[key]
        print(f"| {r['devices']} | sitegate / {peer} | {q['rate']}× | {q['p50_ms']}× | {q['p99_ms']}× | | {q['cpu_us_per_msg']}× | {q['peak_rss_mib']}× | {q['peak_anon_mib']}× | |")
if any("storm" in r[b] for r in runs for b in BROKERS):
    print()
    print("| devices | broker | dropped | back | all back s | handshakes/s | kept p99 before ms | kept p99 during ms | simulator connection errors |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in runs:
        for b in BROKERS:
            x = r[b].get("storm")
            if x:
                print(f"| {r['devices']} | {b} | {x['dropped']} | {x['reconnected']} | {x['all_back_s']} | {x['handshakes_per_s']} | {x['kept_p99_before_ms']:.2f} | {x['kept_p99_during_ms']:.2f} | {r[b]['simulator_errors']} |")
print(f"(JSON in {out})")
PY
