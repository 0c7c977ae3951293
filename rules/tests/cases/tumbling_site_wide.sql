-- A window not grouped by device aggregates across the site.
-- input: {"topic":"x/a","thing":"a","payload":{"v":1},"ts":1000}
-- input: {"topic":"x/b","thing":"b","payload":{"v":3},"ts":2000}
-- input: {"topic":"x/a","thing":"a","payload":{"v":5},"ts":11000}
-- expect out: {"n":2,"total":4,"window_start":0,"window_end":10000}
-- expect out: {"n":1,"total":5,"window_start":10000,"window_end":20000}
INSERT INTO out SELECT count(*) AS n, sum(v) AS total FROM 'x/#' GROUP BY TUMBLE(INTERVAL '10' SECOND)
