-- iot-sql-set: "Each variable can only be assigned once (variables are immutable)".
-- expect-error: @a is set twice
INSERT INTO out SET @a = 1, @a = 2 SELECT @a AS a FROM 'x'
