-- iot-sql-select: `SELECT *` is the whole payload, so a null field, an array holding nulls and
-- an empty object come back unchanged.
-- input: {"topic":"x","thing":"d","payload":{"a":null,"b":{"c":null,"d":{}},"e":[null,1],"f":{}},"ts":1}
-- expect all: {"a":null,"b":{"c":null,"d":{}},"e":[null,1],"f":{}}
INSERT INTO all SELECT * FROM 'x'
