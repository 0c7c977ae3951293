-- iot-sql-json (JSON extensions): `a[0]` reads an array's item and `.key` an object's field, on
-- a field or on a function's result; out of bounds or on another type is Undefined.
-- input: {"topic":"x","thing":"d","payload":{"a":[{"b":1},{"b":2,"c":[7,8]}],"m":{"k":["z"]}},"ts":1}
-- expect out: {"first":{"b":1},"b1":2,"c":8,"k":"z","@left_out":["none"]}
INSERT INTO out SELECT a[0] AS first, a[1].b AS b1, a[1].c[1] AS c, m.k[0] AS k, a[5].b AS none
FROM 'x'
