-- iot-sql-functions, isUndefined(): needs Null and Undefined kept apart, which this engine does
-- not do yet; refused at load rather than answered with another meaning.
-- expect-error: isUndefined() is not supported at the edge yet
INSERT INTO out SELECT isUndefined(v) AS u FROM 'x'
