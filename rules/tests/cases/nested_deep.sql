-- Deeply nested fields reached with a.b.c, and a nested object selected whole via SELECT *.
-- input: {"topic":"x","thing":"d","payload":{"a":{"b":{"c":42,"d":"x"}}},"ts":1}
-- expect out: {"c":42,"both":"42x"}
INSERT INTO out SELECT a.b.c AS c, concat(a.b.c, a.b.d) AS both FROM 'x'
