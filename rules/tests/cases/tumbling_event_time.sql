-- Tumbling by the payload's own time: arrival order does not matter within the lateness.
-- input: {"topic":"x","thing":"d","payload":{"at":5000,"v":1},"ts":1}
-- input: {"topic":"x","thing":"d","payload":{"at":1000,"v":2},"ts":2}
-- input: {"topic":"x","thing":"d","payload":{"at":12000,"v":4},"ts":3}
-- until: 3
-- expect out: {"total":3,"first_v":2,"last_v":1,"window_start":0,"window_end":10000}
INSERT INTO out SELECT sum(v) AS total, first(v) AS first_v, last(v) AS last_v FROM 'x' GROUP BY TUMBLE(at, INTERVAL '10' SECOND)
