-- A field changing type between messages does not stop the rule.
-- input: {"topic":"x","thing":"d","payload":{"t":21},"ts":1}
-- input: {"topic":"x","thing":"d","payload":{"t":"21.5"},"ts":2}
-- input: {"topic":"x","thing":"d","payload":{"t":22.5},"ts":3}
-- expect out: {"t":21}
-- expect out: {"t":"21.5"}
-- expect out: {"t":22.5}
INSERT INTO out SELECT t FROM 'x'
