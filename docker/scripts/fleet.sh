#!/bin/sh
# A small fleet: device N publishes a reading every second as sim-N, with its own certificate.
# Usage: fleet.sh GATEWAY_HOST DEVICES
set -eu
host=$1
count=$2
sleep 5
i=1
while [ "$i" -le "$count" ]; do
  (
    seq=0
    while true; do
      temp=$(( (seq * 7 + i * 3) % 15 - 20 ))
      mosquitto_pub -h "$host" -p 8883 --cafile /pki/ca.pem \
        --cert "/pki/devices/sim-$i.pem" --key "/pki/devices/sim-$i.key" \
        -i "sim-$i" -q 1 -t "dt/sim-$i/freezer" -m "{\"seq\":$seq,\"temp\":$temp}" || sleep 2
      seq=$((seq + 1))
      sleep 1
    done
  ) &
  i=$((i + 1))
done
wait
