-- A searched CASE with several branches.
-- input: {"topic":"x","thing":"d","payload":{"t":-25},"ts":1}
-- input: {"topic":"x","thing":"d","payload":{"t":-12},"ts":2}
-- input: {"topic":"x","thing":"d","payload":{"t":3},"ts":3}
-- expect out: {"state":"frozen"}
-- expect out: {"state":"cold"}
-- expect out: {"state":"warm"}
INSERT INTO out SELECT CASE WHEN t < -18 THEN 'frozen' WHEN t < 0 THEN 'cold' ELSE 'warm' END AS state FROM 'x'
