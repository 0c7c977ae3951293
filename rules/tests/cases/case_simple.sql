-- A simple CASE on a value.
-- input: {"topic":"x","thing":"d","payload":{"code":2},"ts":1}
-- expect out: {"name":"two"}
INSERT INTO out SELECT CASE code WHEN 1 THEN 'one' WHEN 2 THEN 'two' ELSE 'many' END AS name FROM 'x'
