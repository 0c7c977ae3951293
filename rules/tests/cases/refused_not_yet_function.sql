-- get_or_default() (listed among the functions sitegate knows of, not on the stored
-- iot-sql-functions page this engine follows) is refused at load rather than answered with
-- another meaning.
-- expect-error: get_or_default() is not supported at the edge yet
INSERT INTO out SELECT get_or_default(v, 1) AS u FROM 'x'
