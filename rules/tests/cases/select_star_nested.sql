-- SELECT * is the payload, nested fields included; a.b reaches into them; EMQX's "…" source.
-- input: {"topic":"dt/pump-1/state","thing":"pump-1","payload":{"rpm":1200,"motor":{"amps":4.5,"hot":false}},"ts":1}
-- input: {"topic":"dt/pump-1/state","thing":"pump-1","payload":{"rpm":900,"motor":{"amps":9.5,"hot":true}},"ts":2}
-- expect all: {"rpm":1200,"motor":{"amps":4.5,"hot":false}}
-- expect all: {"rpm":900,"motor":{"amps":9.5,"hot":true}}
-- expect hot: {"amps":9.5,"pump":"pump-1"}
INSERT INTO all SELECT * FROM "dt/+/state";
INSERT INTO hot SELECT motor.amps AS amps, topic(2) AS pump FROM "dt/+/state" WHERE motor.hot = true
