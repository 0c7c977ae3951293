-- iot-sql-data-types: a nested field absent from a message is Undefined and left out of the
-- row; isUndefined() (iot-sql-functions) tells it apart.
-- input: {"topic":"x","thing":"d","payload":{"a":{"b":1}},"ts":1}
-- input: {"topic":"x","thing":"d","payload":{"a":{}},"ts":2}
-- expect out: {"b":1,"has":false}
-- expect out: {"has":true,"@left_out":["b"]}
INSERT INTO out SELECT a.b AS b, isUndefined(a.b) AS has FROM 'x'
