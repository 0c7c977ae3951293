-- Projection with literals, renaming and arithmetic. iot-sql-data-types: with SQL version
-- 2016-03-23 a whole-number Decimal is processed as an Int, so 2 / 2.0 is output as 1.
-- input: {"topic":"dt/p-1/t","thing":"p-1","payload":{"a":2,"b":3},"ts":1}
-- expect out: {"sum":5,"product":6,"label":"fixed","half":1}
INSERT INTO out SELECT a + b AS sum, a * b AS product, 'fixed' AS label, a / 2.0 AS half FROM 'dt/+/t'
