-- iot-sql-nested-queries: `(SELECT VALUE n FROM e)` over an array field is not computed at
-- the edge yet; refused at load rather than planned as a query of another table.
-- expect-error: nested queries
INSERT INTO out SELECT (SELECT VALUE n FROM e) AS sensors FROM 'my/topic'
