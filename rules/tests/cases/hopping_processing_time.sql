-- Hopping by processing time: one message lands in two overlapping windows.
-- input: {"topic":"x","thing":"d","payload":{"v":1},"ts":7000}
-- expect out: {"n":1,"window_start":0,"window_end":10000}
-- expect out: {"n":1,"window_start":5000,"window_end":15000}
INSERT INTO out SELECT count(*) AS n FROM 'x' GROUP BY HOP(INTERVAL '10' SECOND, INTERVAL '5' SECOND)
