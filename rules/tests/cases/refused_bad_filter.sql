-- A FROM that is not a topic filter is refused.
-- expect-error: not an MQTT topic filter
INSERT INTO out SELECT v FROM 'a/#/b'
