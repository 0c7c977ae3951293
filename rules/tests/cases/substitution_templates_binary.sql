-- iot-substitution-templates with binary-payloads: `SELECT *` passes a payload that is not
-- JSON on as its bytes, and the template's fields are Undefined for it (rendered empty), while
-- `encode(*, 'base64')` still encodes the bytes as they came; the statement itself names no
-- field, so it takes such a payload.
-- template out: b/${upper(a)}/${encode(*, 'base64')}
-- input: {"topic":"x","thing":"d","payload":"raw","ts":1}
-- input: {"topic":"x","thing":"d","payload":{"a":"q"},"ts":2}
-- expect out: {"@raw":"raw","@templates":["","cmF3"]}
-- expect out: {"a":"q","@templates":["Q","eyJhIjoicSJ9"]}
INSERT INTO out SELECT * FROM 'x'
