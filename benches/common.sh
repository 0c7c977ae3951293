# Sourced by the comparison scripts (compare.sh, downlink.sh): what they need and check first,
# the sitegate binary they measure, a work folder and the processes to stop when they end,
# and loopback ports. SCRIPT names the caller in messages.
command -v mosquitto >/dev/null || { echo "$SCRIPT: mosquitto is not installed (apt-get install mosquitto mosquitto-clients)" >&2; exit 2; }
command -v mosquitto_sub >/dev/null || { echo "$SCRIPT: mosquitto_sub is not installed (apt-get install mosquitto-clients)" >&2; exit 2; }
MOSQUITTO=$(command -v mosquitto)
TARGET=${CARGO_TARGET_DIR:-target}

if [ -n "${SITEGATE_BIN:-}" ]; then
  BIN=$SITEGATE_BIN
else
  cargo build --release -q -p sitegate --bin sitegate
  BIN=$TARGET/release/sitegate
fi
WORK=$(mktemp -d)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

# The lines of a Mosquitto listener on 127.0.0.1:PORT with mutual TLS from the CA folder
# DIR (`sitegate ca init`): client certificates required, the certificate's CN as user name.
tls_listener() { # PORT DIR
  printf 'listener %s 127.0.0.1\ncafile %s/ca.pem\ncertfile %s/gateway.pem\nkeyfile %s/gateway.key\n' "$1" "$2" "$2" "$2"
  printf 'require_certificate true\nuse_identity_as_username true\nallow_anonymous true\nlog_dest none\n'
  # Started as root, Mosquitto drops to user mosquitto, which cannot read the 0600 key.
  [ "$(id -u)" != 0 ] || echo "user root"
}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() {
  for _ in $(seq 100); do
    python3 -c "import socket,sys; socket.create_connection(('127.0.0.1',$1),0.2)" 2>/dev/null && return 0
    sleep 0.1
  done
  echo "$SCRIPT: nothing listens on 127.0.0.1:$1" >&2; return 1
}
