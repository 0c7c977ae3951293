-- A nested field absent from a message is NULL and left out of the row.
-- input: {"topic":"x","thing":"d","payload":{"a":{"b":1}},"ts":1}
-- input: {"topic":"x","thing":"d","payload":{"a":{}},"ts":2}
-- expect out: {"b":1,"has":true}
-- expect out: {"has":false,"@left_out":["b"]}
INSERT INTO out SELECT a.b AS b, a.b IS NOT NULL AS has FROM 'x'
