-- A payload the rule cannot decode goes to the error sink with the reason and the original
-- payload; the rest of the batch carries on. A declared type is enforced.
-- @schema temp DOUBLE
-- input: {"topic":"dt/t-1/temp","thing":"t-1","payload":"not json","ts":1}
-- input: {"topic":"dt/t-1/temp","thing":"t-1","payload":{"temp":"warm"},"ts":2}
-- input: {"topic":"dt/t-1/temp","thing":"t-1","payload":{"temp":21.5},"ts":3}
-- expect errors: {"ruleName":"errors_to_error_sink","topic":"dt/t-1/temp","clientId":"t-1","base64OriginalPayload":"bm90IGpzb24="}
-- expect errors: {"ruleName":"errors_to_error_sink","reason":"column temp: declared Double, got \"warm\""}
-- expect temps: {"temp":21.5}
INSERT INTO temps SELECT temp FROM 'dt/+/temp'
