-- iot-sql-functions, decode(): "Currently, only 'base64' is supported"; another scheme is
-- refused when the rule loads.
-- expect-error: the only one is 'base64'
INSERT INTO out SELECT decode(v, 'hex') AS d FROM 'x'
