-- BETWEEN and IN (not on IoT SQL's operators page) are built from the operators that are
-- (iot-sql-operators): `x BETWEEN a AND b` is `x >= a AND x <= b`, so a numeric string is
-- compared as a Decimal and a value that does not convert gives Undefined; `x IN (a, b)` is
-- `x = a OR x = b`, so values of another type are unequal (5 is not IN ('5')). LIKE matches a
-- value's string form (iot-sql-data-types, "To string"). The answers do not depend on the
-- other messages of the batch.
-- input: {"topic":"x","thing":"d","payload":{"t":"5","z":5,"m":12},"ts":1}
-- input: {"topic":"x","thing":"d","payload":{"t":"warm","z":"5","m":"FZ"},"ts":2}
-- input: {"topic":"x","thing":"d","payload":{"t":50,"z":true,"m":[1]},"ts":3}
-- expect out: {"btw":true,"in_num":true,"in_str":false,"not_in":false,"lk":true}
-- expect out: {"in_num":false,"in_str":true,"not_in":true,"lk":false,"@left_out":["btw"]}
-- expect out: {"btw":false,"in_num":false,"in_str":false,"not_in":true,"lk":false}
INSERT INTO out SELECT t BETWEEN 0 AND 10 AS btw, z IN (5, 6) AS in_num,
       z IN ('5') AS in_str, z NOT IN (5) AS not_in, m LIKE '1%' AS lk
FROM 'x'
