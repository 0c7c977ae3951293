-- WHERE applies before a window's aggregate.
-- input: {"topic":"x","thing":"d","payload":{"v":1,"ok":true},"ts":1000}
-- input: {"topic":"x","thing":"d","payload":{"v":100,"ok":false},"ts":2000}
-- input: {"topic":"x","thing":"d","payload":{"v":3,"ok":true},"ts":3000}
-- expect out: {"avg_v":2}
INSERT INTO out SELECT avg(v) AS avg_v FROM 'x' WHERE ok = true GROUP BY TUMBLE(INTERVAL '1' MINUTE)
