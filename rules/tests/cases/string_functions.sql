-- String functions with the names IoT Core uses. iot-sql-functions, substring(String, Int[, Int]):
-- indices are 0-based, the second exclusive, so substring(s, 1, 4) of "Freezer-A" is "ree".
-- input: {"topic":"x","thing":"d","payload":{"s":"  Freezer-A  "},"ts":1}
-- expect out: {"t":"Freezer-A","u":"FREEZER-A","l":"freezer-a","n":9,"sub":"ree"}
INSERT INTO out SELECT trim(s) AS t, upper(trim(s)) AS u, lower(trim(s)) AS l, length(trim(s)) AS n, substring(trim(s), 1, 4) AS sub FROM 'x'
