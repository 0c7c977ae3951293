-- iot-sql-nested-queries: inside a nested query sitegate evaluates fields, literals, the
-- operators and get(); another function there is refused at load, not run with another
-- meaning.
-- expect-error: upper() inside a nested query is not supported at the edge yet
INSERT INTO out SELECT (SELECT VALUE upper(n) FROM e) AS sensors FROM 'my/topic'
