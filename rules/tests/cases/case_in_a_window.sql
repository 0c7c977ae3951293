-- iot-sql-case in a window's aggregate: a CASE whose every branch has one type is a typed
-- value (here Int), so sum() can add it; how many readings of a minute were hot.
-- input: {"topic":"x","thing":"d","payload":{"v":1},"ts":1000}
-- input: {"topic":"x","thing":"d","payload":{"v":5},"ts":2000}
-- input: {"topic":"x","thing":"d","payload":{"v":7},"ts":3000}
-- expect out: {"thing":"d","hot":2,"n":3}
INSERT INTO out SELECT thing_name() AS thing, sum(CASE WHEN v > 1 THEN 1 ELSE 0 END) AS hot, count(*) AS n
FROM 'x' GROUP BY thing_name(), TUMBLE(INTERVAL '1' MINUTE)
