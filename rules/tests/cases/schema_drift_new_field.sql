-- A new field appearing does not stop the rule.
-- input: {"topic":"x","thing":"d","payload":{"a":1},"ts":1}
-- input: {"topic":"x","thing":"d","payload":{"a":2,"b":"new"},"ts":2}
-- expect out: {"a":1}
-- expect out: {"a":2,"b":"new"}
INSERT INTO out SELECT * FROM 'x'
