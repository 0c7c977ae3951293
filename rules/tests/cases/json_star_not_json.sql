-- iot-sql-json, "* Operator": "If the message payload is not in JSON format, * returns the
-- entire message payload as raw bytes". Raw bytes have no fields, so `get(*, key)` is
-- Undefined for them, and a statement that names no field still takes such a payload
-- (binary-payloads): its row leaves the key out. `encode(*, 'base64')` still encodes the
-- bytes as they came.
-- input: {"topic":"x","thing":"d","payload":"not json","ts":1}
-- input: {"topic":"x","thing":"d","payload":{"order":1},"ts":2}
-- expect all: {"b64":"bm90IGpzb24=","@left_out":["order"]}
-- expect all: {"order":1,"b64":"eyJvcmRlciI6MX0="}
INSERT INTO all SELECT get(*, 'order') AS order, encode(*, 'base64') AS b64 FROM 'x'
