-- iot-sql-set: a variable is used only after the SET clause sets it.
-- expect-error: @b is not set
INSERT INTO out SET @a = 1 SELECT @b AS b FROM 'x'
