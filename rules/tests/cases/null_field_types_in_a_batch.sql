-- iot-sql-data-types: a field that is a number in one message and null in another keeps each
-- message's own value (the batch holds both); a filter on it sees a Null as no number.
-- input: {"topic":"x","thing":"d","payload":{"t":5},"ts":1}
-- input: {"topic":"x","thing":"d","payload":{"t":null},"ts":2}
-- input: {"topic":"x","thing":"d","payload":{},"ts":3}
-- expect out: {"t":5,"big":true}
-- expect out: {"t":null,"@left_out":["big"]}
-- expect out: {"@left_out":["t","big"]}
INSERT INTO out SELECT t, t > 1 AS big FROM 'x'
