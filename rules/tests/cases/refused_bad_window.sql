-- A hopping window whose slide exceeds its size is refused.
-- expect-error: slide must not exceed its size
INSERT INTO out SELECT count(*) AS n FROM 'x' GROUP BY HOP(INTERVAL '5' SECOND, INTERVAL '10' SECOND)
