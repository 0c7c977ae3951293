-- IS NULL is not AWS IoT SQL (iot-sql-operators has no such operator); a rule using it is
-- refused with the functions that say what it could mean: isNull() for a Null value,
-- isUndefined() for a missing one (iot-sql-functions).
-- expect-error: use isNull(x) for a null value or isUndefined(x) for a missing one
INSERT INTO out SELECT v FROM 'x' WHERE v IS NOT NULL
