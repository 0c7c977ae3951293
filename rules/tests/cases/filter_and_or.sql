-- AND / OR / NOT in WHERE.
-- input: {"topic":"x/1","thing":"d-1","payload":{"a":1,"b":true},"ts":1}
-- input: {"topic":"x/2","thing":"d-2","payload":{"a":5,"b":false},"ts":2}
-- input: {"topic":"x/3","thing":"d-3","payload":{"a":9,"b":true},"ts":3}
-- expect out: {"a":1}
-- expect out: {"a":5}
INSERT INTO out SELECT a FROM 'x/#' WHERE (a < 3 AND b) OR (NOT b AND a > 3)
