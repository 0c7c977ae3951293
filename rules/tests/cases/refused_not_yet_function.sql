-- iot-sql-functions, get_or_default(): not computed at the edge yet; refused at load rather
-- than answered with another meaning.
-- expect-error: get_or_default() is not supported at the edge yet
INSERT INTO out SELECT get_or_default(v, 1) AS u FROM 'x'
