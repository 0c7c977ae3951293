-- A message without the filtered field is simply not selected (NULL > x is not true).
-- input: {"topic":"x","thing":"d","payload":{"other":1},"ts":1}
-- input: {"topic":"x","thing":"d","payload":{"t":5},"ts":2}
-- expect out: {"t":5}
INSERT INTO out SELECT t FROM 'x' WHERE t > 0
