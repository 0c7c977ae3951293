#!/usr/bin/env bash
# Cloud to device, side by side in one run on this machine: a "cloud" Mosquitto (mutual TLS,
# require_certificate, standing in for IoT Core) and a local device subscribed with its own
# certificate, through
#   1. sitegate: a `[downlinks.cmd]` on its cloud link (cloud `cmd/bench/#` → local `cmd/#`),
#      the device's policy checked on its SUBSCRIBE, QoS 1 end to end;
#   2. Mosquitto's bridge (Debian package): a local Mosquitto with the site's CA and a
#      `connection` to the cloud with `topic # in 1 cmd/ cmd/bench/`, the same mapping.
# Phase "latency": MESSAGES QoS 1 messages at RATE/s into the cloud, each carrying its send
# time; p50/p99/max of cloud publish → device receive. Phase "burst": BURST messages from
# PUBLISHERS connections at once; throughput is messages the device received per second,
# first send to last receive. Also the CPU seconds of the path's own process (sitegate, or the
# bridging Mosquitto) over both phases. For reference, the latency phase once more with a
# local device publishing to the same device through sitegate (no cloud). Prints a table and
# writes JSON.
#
# Usage: benches/downlink.sh
# Environment: MESSAGES (2000), RATE (200), BURST (20000), PUBLISHERS (4), OUT JSON file
# (target/downlink.json), SITEGATE_BIN (a release sitegate; built when unset).
# Needs: mosquitto, mosquitto-clients, python3. Loopback only.
set -euo pipefail
cd "$(dirname "$0")/.."

MESSAGES=${MESSAGES:-2000}
RATE=${RATE:-200}
BURST=${BURST:-20000}
PUBLISHERS=${PUBLISHERS:-4}
OUT=${OUT:-${CARGO_TARGET_DIR:-target}/downlink.json}

SCRIPT=downlink.sh
# shellcheck source=benches/common.sh
. benches/common.sh
cpu_of() { # PID: user + system CPU seconds
  python3 -c "import os,sys; f=open('/proc/$1/stat').read().rsplit(')',1)[1].split(); print((int(f[11])+int(f[12]))/os.sysconf('SC_CLK_TCK'))"
}

# The site's CA (the local device and both local brokers) and the cloud's.
"$BIN" ca init --dir "$WORK/pki" --site bench >/dev/null
"$BIN" ca init --dir "$WORK/cloud" --site cloud >/dev/null
for thing in pump-1 ctl-1; do
  "$BIN" device issue "$thing" --ca "$WORK/pki" --out "$WORK/dev" >/dev/null
done
for who in gateway-link bridge operator; do
  "$BIN" device issue "$who" --ca "$WORK/cloud" --out "$WORK/cloud-clients" >/dev/null
done

CLOUD_PORT=$(free_port)
{ tls_listener "$CLOUD_PORT" "$WORK/cloud"; echo "max_queued_messages 100000"; } > "$WORK/cloud.conf"
"$MOSQUITTO" -c "$WORK/cloud.conf" & PIDS+=("$!")
wait_port "$CLOUD_PORT"

# Publishes into the cloud: `latency` paces MESSAGES at RATE/s on one connection; `burst`
# sends BURST as fast as PUBLISHERS connections take them. Each payload is its send time.
# With `local`, the publisher is instead a local device (ctl-1) on sitegate itself, to the
# device's local topic: the gateway's own device-to-device path, for reference.
cloud_publish() { # latency|burst [local]
  local mode=$1
  local port=$CLOUD_PORT ca=$WORK/cloud/ca.pem id=$WORK/cloud-clients/operator topic=cmd/bench/pump-1/set
  if [ "${2:-}" = local ]; then port=$SG_PORT ca=$WORK/pki/ca.pem id=$WORK/dev/ctl-1 topic=cmd/pump-1/set; fi
  local pubs=1 count=$MESSAGES pace=$RATE
  if [ "$mode" = burst ]; then pubs=$PUBLISHERS; count=$(( BURST / PUBLISHERS )); pace=0; fi
  local p pids=()
  for p in $(seq "$pubs"); do
    local client="operator-$p"; [ "${2:-}" = local ] && client=ctl-1
    python3 - "$count" "$pace" <<'PY' | mosquitto_pub -h 127.0.0.1 -p "$port" \
        --cafile "$ca" --cert "$id.pem" --key "$id.key" -i "$client" -V mqttv5 -q 1 \
        -t "$topic" -l &
import sys, time
count, rate = int(sys.argv[1]), float(sys.argv[2])
start = time.time()
for i in range(count):
    if rate:
        wait = start + i / rate - time.time()
        if wait > 0:
            time.sleep(wait)
    print(f"{time.time():.9f}", flush=True)
PY
    pids+=("$!")
  done
  for p in "${pids[@]}"; do wait "$p" || true; done
}

# One path: subscribe the device on PORT, run both phases (only latency for `local`), report.
measure() { # NAME PORT PID [local]
  local name=$1 port=$2 pid=$3 from=${4:-}
  local cpu0; cpu0=$(cpu_of "$pid")
  local phase phases=(latency burst)
  [ "$from" = local ] && phases=(latency)
  for phase in "${phases[@]}"; do
    local want=$MESSAGES; [ "$phase" = burst ] && want=$(( BURST / PUBLISHERS * PUBLISHERS ))
    timeout 300 mosquitto_sub -h 127.0.0.1 -p "$port" --cafile "$WORK/pki/ca.pem" \
      --cert "$WORK/dev/pump-1.pem" --key "$WORK/dev/pump-1.key" -i pump-1 -V mqttv5 \
      -t 'cmd/pump-1/#' -q 1 -F '%U %p' -C "$want" > "$WORK/$name-$phase.txt" & local sub=$!
    sleep 1
    cloud_publish "$phase" "$from"
    wait "$sub" || echo "downlink.sh: $name $phase: the device got $(wc -l < "$WORK/$name-$phase.txt") of $want" >&2
  done
  echo "$(cpu_of "$pid") $cpu0" > "$WORK/$name.cpu"
}

# 1. sitegate.
SG_PORT=$(free_port)
mkdir -p "$WORK/sitegate"
cat > "$WORK/sitegate/sitegate.toml" <<EOF
site = "bench"
data_dir = "data"

[listener]
mqtts = "127.0.0.1:$SG_PORT"
ca = "$WORK/pki/ca.pem"
cert = "$WORK/pki/gateway.pem"
key = "$WORK/pki/gateway.key"

[auth.device_groups.pumps]
selection_rule = "thingName: pump-*"
policy = "pump"

[auth.policies.pump.all]
operations = ["mqtt:connect", "mqtt:subscribe"]
resources = ["mqtt:clientId:\${iot:Connection.Thing.ThingName}", "mqtt:topicfilter:cmd/\${iot:Connection.Thing.ThingName}/#"]

[auth.device_groups.controllers]
selection_rule = "thingName: ctl-*"
policy = "controller"

[auth.policies.controller.all]
operations = ["mqtt:connect", "mqtt:publish"]
resources = ["mqtt:clientId:\${iot:Connection.Thing.ThingName}", "mqtt:topic:cmd/+/#"]

[sinks.cloud]
type = "iotcore"
endpoint = "127.0.0.1:$CLOUD_PORT"
cert = "$WORK/cloud-clients/gateway-link.pem"
key = "$WORK/cloud-clients/gateway-link.key"
ca = "$WORK/cloud/ca.pem"

[downlinks.cmd]
sink = "cloud"
from = "cmd/\${site}/#"
to = "cmd/#"

[spool.encryption]
key_file = "$WORK/pki/spool.kek"
EOF
for thing in pump-1 ctl-1; do
  "$BIN" device approve "$thing" --config "$WORK/sitegate/sitegate.toml" >/dev/null
done
RUST_LOG=warn "$BIN" run --config "$WORK/sitegate/sitegate.toml" 2>"$WORK/sitegate/gateway.log" & SG=$!; PIDS+=("$SG")
wait_port "$SG_PORT"
sleep 1
measure sitegate "$SG_PORT" "$SG"
measure local "$SG_PORT" "$SG" local
kill "$SG"; wait "$SG" 2>/dev/null || true

# 2. Mosquitto's bridge.
BR_PORT=$(free_port)
mkdir -p "$WORK/bridge"
tls_listener "$BR_PORT" "$WORK/pki" > "$WORK/bridge/mosquitto.conf"
cat >> "$WORK/bridge/mosquitto.conf" <<EOF
max_queued_messages 100000

connection cloud
address 127.0.0.1:$CLOUD_PORT
bridge_protocol_version mqttv50
bridge_cafile $WORK/cloud/ca.pem
bridge_certfile $WORK/cloud-clients/bridge.pem
bridge_keyfile $WORK/cloud-clients/bridge.key
bridge_insecure false
remote_clientid bench-bridge
cleansession false
topic # in 1 cmd/ cmd/bench/
EOF
"$MOSQUITTO" -c "$WORK/bridge/mosquitto.conf" & BR=$!; PIDS+=("$BR")
wait_port "$BR_PORT"
sleep 2
measure bridge "$BR_PORT" "$BR"

python3 - "$WORK" "$OUT" "$MESSAGES" "$RATE" "$BURST" "$PUBLISHERS" <<'PY'
import json, sys
work, out, messages, rate, burst, pubs = sys.argv[1:]
rows = {}
for name in ("sitegate", "bridge", "local"):
    row = {}
    lat = []
    for line in open(f"{work}/{name}-latency.txt"):
        got, sent = line.split()
        lat.append((float(got) - float(sent)) * 1000)
    lat.sort()
    pick = lambda q: round(lat[min(len(lat) - 1, int(q * len(lat)))], 2) if lat else None
    row.update(received=len(lat), p50_ms=pick(0.50), p99_ms=pick(0.99), max_ms=round(lat[-1], 2) if lat else None)
    try:
        b = [tuple(map(float, l.split())) for l in open(f"{work}/{name}-burst.txt")]
    except FileNotFoundError:
        b = []
    if b:
        first_sent = min(s for _, s in b)
        last_got = max(g for g, _ in b)
        row.update(burst_received=len(b), burst_per_s=round(len(b) / (last_got - first_sent)))
    cpu, cpu0 = map(float, open(f"{work}/{name}.cpu").read().split())
    row["cpu_s"] = round(cpu - cpu0, 2)
    total = len(lat) + len(b)
    row["cpu_us_per_msg"] = round((cpu - cpu0) * 1e6 / total, 1) if total else None
    rows[name] = row
json.dump({"messages": int(messages), "rate": int(rate), "burst": int(burst), "publishers": int(pubs), "paths": rows}, open(out, "w"), indent=2)
print(f"cloud → device: {messages} QoS 1 messages at {rate}/s, then {burst} at once from {pubs} publishers\n")
print("| path | received | p50 ms | p99 ms | max ms | burst received | burst msg/s | CPU s | CPU µs/msg |")
print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
for name, r in rows.items():
    label = {"sitegate": "sitegate downlink", "bridge": "Mosquitto bridge",
             "local": "sitegate device → device (reference)"}[name]
    print(f"| {label} | {r['received']} | {r['p50_ms']} | {r['p99_ms']} | {r['max_ms']} | {r.get('burst_received')} | {r.get('burst_per_s')} | {r['cpu_s']} | {r['cpu_us_per_msg']} |")
s, m = rows["sitegate"], rows["bridge"]
ratio = lambda a, b: round(a / b, 2) if a and b else None
print(f"| sitegate / bridge | | {ratio(s['p50_ms'], m['p50_ms'])}× | {ratio(s['p99_ms'], m['p99_ms'])}× | | | {ratio(s.get('burst_per_s'), m.get('burst_per_s'))}× | | {ratio(s['cpu_us_per_msg'], m['cpu_us_per_msg'])}× |")
print(f"\nJSON: {out}")
PY
