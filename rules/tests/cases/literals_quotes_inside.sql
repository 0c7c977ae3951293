-- A quote inside a string literal: doubled in a single-quoted one ('it''s'), as is in a
-- double-quoted one ("say 'hi'", as the parse_time example of iot-sql-functions writes its
-- pattern).
-- input: {"topic":"x","thing":"d","payload":{"s":"it's"},"ts":1}
-- expect out: {"a":"it's","b":"say 'hi'","same":true}
INSERT INTO out SELECT 'it''s' AS a, "say 'hi'" AS b, s = 'it''s' AS same FROM 'x'
