-- iot-sql-select: SELECT VALUE selects one item.
-- expect-error: SELECT VALUE takes one expression
INSERT INTO out SELECT VALUE a, b FROM 'x'
