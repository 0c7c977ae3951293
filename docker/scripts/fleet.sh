#!/bin/sh
# The virtual fleet: waits for the gateway's admin socket, approves the devices into the
# `fleet` group and runs them until stopped (`sitegate simulate`).
# Usage: fleet.sh GATEWAY_HOST:PORT DEVICES
set -eu
gateway=$1
devices=$2
config=/etc/sitegate/sitegate.toml
for attempt in $(seq 1 60); do
  [ -S /var/lib/sitegate/admin.sock ] && break
  sleep 1
done
exec sitegate simulate --gateway "$gateway" --ca /etc/sitegate/pki --devices "$devices" \
  --rate 10 --duration 31536000 --profile mixed --misbehaving 2 \
  --approve-as fleet --config "$config" --quiet
