-- String functions with the names IoT Core uses.
-- input: {"topic":"x","thing":"d","payload":{"s":"  Freezer-A  "},"ts":1}
-- expect out: {"t":"Freezer-A","u":"FREEZER-A","l":"freezer-a","n":9,"sub":"Free"}
INSERT INTO out SELECT trim(s) AS t, upper(trim(s)) AS u, lower(trim(s)) AS l, length(trim(s)) AS n, substring(trim(s), 1, 4) AS sub FROM 'x'
