-- iot-sql-functions, decode(value, 'base64'): a JSON document decodes to an addressable object,
-- other text to a String, and what cannot be decoded is NULL. The page's example: encoded_temp
-- "eyAidGVtcGVyYXR1cmUiOiAzMyB9Cg==" with decode(encoded_temp,"base64").temperature AS temp
-- gives {"temp": 33}.
-- input: {"topic":"topic/subtopic","thing":"d","payload":{"encoded_temp":"eyAidGVtcGVyYXR1cmUiOiAzMyB9Cg==","plain":"aGVsbG8=","bad":"%%%"},"ts":1}
-- expect out: {"temp":33,"whole":{"temperature":33},"text":"hello","bad":null}
INSERT INTO out SELECT decode(encoded_temp,"base64").temperature AS temp,
       decode(encoded_temp, 'base64') AS whole, decode(plain, 'base64') AS text,
       decode(bad, 'base64') AS bad
FROM 'topic/subtopic'
