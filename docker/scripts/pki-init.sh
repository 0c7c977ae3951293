#!/bin/sh
# Site CA, gateway certificate (SAN "sitegate", the compose service name), spool key file and
# certificates for the fleet. Runs on every `up`; keeps what exists.
set -eu
dir=/etc/sitegate/pki
sitegate ca init --dir "$dir" --site compose --san sitegate --if-missing
for n in 1 2 3 4 5; do
  [ -f "$dir/devices/sim-$n.pem" ] || sitegate device issue "sim-$n" --ca "$dir" --out "$dir/devices"
done
