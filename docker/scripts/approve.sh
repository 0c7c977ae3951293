#!/bin/sh
# Waits for the gateway's admin socket, then approves the fleet into its group.
set -eu
config=/etc/sitegate/sitegate.toml
for attempt in $(seq 1 60); do
  [ -S /var/lib/sitegate/admin.sock ] && break
  sleep 1
done
for n in 1 2 3 4 5; do
  sitegate device approve "sim-$n" --group fleet --config "$config"
done
