-- iot-sql-select: a payload field is selected by its name. Names that are also SQL words but
-- have no other meaning where they stand are fields: `value` when no expression follows it
-- (SELECT VALUE needs one: select_value.sql), and the time units `day`, `hour`, `minute`,
-- `second` anywhere but after `INTERVAL '…'`.
-- input: {"topic":"x","thing":"d","payload":{"value":21.5,"day":3,"hour":14,"minute":5,"second":9,"millisecond":1},"ts":1}
-- input: {"topic":"x","thing":"d","payload":{"value":{"x":[1,2]}},"ts":2}
-- expect out: {"value":21.5,"day":3,"hour":14,"minute":5,"second":9,"ms":1,"late":true}
-- expect nested: {"@left_out":["second","x"]}
-- expect nested: {"second":2,"x":[1,2]}
INSERT INTO out SELECT value, day, hour, minute AS minute, second, millisecond AS ms, hour > 12 AS late
FROM 'x' WHERE value > 20 AND day = 3;
INSERT INTO nested SELECT value.x[1] AS second, value.x AS x FROM 'x'
