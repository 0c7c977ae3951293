-- iot-sql-nested-queries: the page's three examples on its message, each as it gives them:
-- (SELECT VALUE n FROM e) gives ["temperature","light","acidity"];
-- (SELECT v FROM e WHERE n = 'temperature') gives [{"v":22.5}];
-- get((SELECT v FROM e WHERE n = 'temperature'), 0).v gives 22.5.
-- input: {"topic":"my/topic","thing":"d","payload":{"e":[{"n":"temperature","u":"Cel","t":1234,"v":22.5},{"n":"light","u":"lm","t":1235,"v":135},{"n":"acidity","u":"pH","t":1235,"v":7}]},"ts":1}
-- expect out: {"sensors":["temperature","light","acidity"],"temperature":[{"v":22.5}],"flat":22.5}
INSERT INTO out SELECT (SELECT VALUE n FROM e) as sensors,
       (SELECT v FROM e WHERE n = 'temperature') as temperature,
       get((SELECT v FROM e WHERE n = 'temperature'), 0).v as flat
FROM 'my/topic'
