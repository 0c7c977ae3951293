-- A declared BIGINT refuses a fractional value and accepts a whole one.
-- @schema count BIGINT
-- input: {"topic":"x","thing":"d","payload":{"count":1.5},"ts":1}
-- input: {"topic":"x","thing":"d","payload":{"count":7},"ts":2}
-- expect errors: {"reason":"column count: declared BigInt, got 1.5"}
-- expect out: {"count":7}
INSERT INTO out SELECT count FROM 'x'
