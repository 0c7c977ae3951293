-- A window's last() of an object field is that object (iot-sql-data-types: an Object is a
-- value), not its JSON text in a string.
-- input: {"topic":"x","thing":"d","payload":{"state":{"on":true}},"ts":1000}
-- input: {"topic":"x","thing":"d","payload":{"state":{"on":false}},"ts":2000}
-- expect out: {"thing":"d","s":{"on":false},"n":2}
INSERT INTO out SELECT thing_name() AS thing, last(state) AS s, count(*) AS n
FROM 'x' GROUP BY thing_name(), TUMBLE(INTERVAL '1' MINUTE)
