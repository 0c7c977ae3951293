-- A rule may name its own error sink.
-- @error_sink rule_errors
-- input: {"topic":"x","thing":"d","payload":"{broken","ts":1}
-- expect rule_errors: {"ruleName":"error_sink_directive","clientId":"d"}
INSERT INTO out SELECT v FROM 'x'
