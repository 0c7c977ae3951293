-- binary-payloads: encode(*, 'base64') encodes the payload as it came, JSON or not; the page's
-- example "SELECT encode(*, 'base64') AS data, timestamp() AS ts FROM 'topic/subtopic'".
-- input: {"topic":"topic/subtopic","thing":"d","payload":"\u0001raw bytes","ts":24}
-- input: {"topic":"topic/subtopic","thing":"d","payload":{"a":1},"ts":36}
-- expect b64: {"data":"AXJhdyBieXRlcw==","ts":24}
-- expect b64: {"data":"eyJhIjoxfQ==","ts":36}
INSERT INTO b64 SELECT encode(*, 'base64') AS data, timestamp() AS ts FROM 'topic/subtopic'
