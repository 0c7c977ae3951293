-- iot-sql-functions, cast(): IoT Core's conversions (cast(x AS DECIMAL), Int from "12.7") are not
-- SQL's; refused at load until they are IoT Core's.
-- expect-error: cast() is not supported at the edge yet
INSERT INTO out SELECT cast(v AS DECIMAL) AS d FROM 'x'
