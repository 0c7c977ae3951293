#!/bin/sh
# Site CA, gateway certificate (SAN "sitegate", the compose service name) and spool key file.
# Runs on every `up`; keeps what exists. The fleet's certificates are issued by the simulator.
set -eu
sitegate ca init --dir /etc/sitegate/pki --site compose --san sitegate --if-missing
