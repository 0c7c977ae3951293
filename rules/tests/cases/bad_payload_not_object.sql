-- A JSON payload that is not an object goes to the error sink.
-- input: {"topic":"x","thing":"d","payload":[1,2,3],"ts":1}
-- input: {"topic":"x","thing":"d","payload":{"v":1},"ts":2}
-- expect errors: {"ruleName":"bad_payload_not_object","reason":"payload is not a JSON object"}
-- expect out: {"v":1}
INSERT INTO out SELECT v FROM 'x'
