-- binary-payloads, rule 1: a statement that refers to a JSON name does not take a binary
-- payload; that message goes to the error sink, and JSON messages are selected as usual.
-- input: {"topic":"topic/subtopic","thing":"d","payload":"\u0001raw bytes","ts":24}
-- input: {"topic":"topic/subtopic","thing":"d","payload":{"a":1},"ts":36}
-- expect errors: {"reason":"payload is not JSON: expected value at line 1 column 1"}
-- expect named: {"a":1}
INSERT INTO named SELECT a FROM 'topic/subtopic'
