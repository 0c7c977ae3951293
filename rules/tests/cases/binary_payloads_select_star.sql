-- binary-payloads: a statement that names no JSON field takes any payload; SELECT * of a
-- payload that is not JSON outputs those bytes unchanged, and a WHERE with only functions is
-- allowed (the page's "SELECT * FROM 'topic/subtopic' WHERE timestamp() % 12 = 0").
-- input: {"topic":"topic/subtopic","thing":"d","payload":"\u0001raw bytes","ts":24}
-- input: {"topic":"topic/subtopic","thing":"d","payload":"skipped: 25 % 12 is not 0","ts":25}
-- input: {"topic":"topic/subtopic","thing":"d","payload":{"a":1},"ts":36}
-- expect raw: {"@raw":"\u0001raw bytes"}
-- expect raw: {"a":1}
INSERT INTO raw SELECT * FROM 'topic/subtopic' WHERE timestamp() % 12 = 0
