-- iot-sql-functions, encode(value, encodingScheme): base64 is the only scheme; the value's
-- string form in standard, padded base64 (RFC 4648 §4; the expected text checked with Python's
-- base64 module).
-- input: {"topic":"x","thing":"d","payload":{"s":"hello world"},"ts":1}
-- expect out: {"a":"aGVsbG8gd29ybGQ=","b":"aGk="}
INSERT INTO out SELECT encode(s, 'base64') AS a, encode("hi", "base64") AS b FROM 'x'
