-- iot-sql-functions and iot-sql-where write string literals in double quotes
-- (upper("hello") = "HELLO", WHERE s = "myValue"): they are strings, not field names. After
-- AS a double-quoted word is still the output name.
-- input: {"topic":"x","thing":"d","payload":{"s":"myValue"},"ts":1}
-- input: {"topic":"x","thing":"d","payload":{"s":"other"},"ts":2}
-- expect out: {"u":"HELLO","out name":"myValue"}
INSERT INTO out SELECT upper("hello") AS u, s AS "out name" FROM 'x' WHERE s = "myValue"
