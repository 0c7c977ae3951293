-- iot-sql-set: a variable is the statement's own; a sink template naming one the statement
-- writing to it does not set is refused at load, naming the sink, the expression and the
-- variable.
-- template out: t/${@celsius}
-- expect-error: sink "out": its template's `${@celsius}`: @celsius is not set in this statement's SET clause
INSERT INTO out SELECT f FROM 'x'
