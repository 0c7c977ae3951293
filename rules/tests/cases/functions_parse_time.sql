-- iot-sql-functions, parse_time(pattern, timestamp[, timezone]): Joda-Time patterns. The
-- page's example: parse_time("yyyy.MM.dd G 'at' HH:mm:ss z", 100000000, "America/Belize") gives
-- "1970.01.01 AD at 21:46:40 CST"; the zone defaults to UTC. A zone the time zone database
-- does not name gives Undefined.
-- input: {"topic":"A/B","thing":"d","payload":{"t":1481825251155},"ts":1}
-- expect out: {"ts":"1970.01.01 AD at 21:46:40 CST","iso":"2016-12-15T18:07:31.155Z","year":"2016","@left_out":["bad_zone"]}
INSERT INTO out SELECT parse_time("yyyy.MM.dd G 'at' HH:mm:ss z", 100000000, "America/Belize") AS ts,
       parse_time("yyyy-MM-dd'T'HH:mm:ss.SSS'Z'", t) AS iso, parse_time("yyyy", t, "UTC") AS year,
       parse_time("yyyy", t, "Mars/Olympus") AS bad_zone
FROM 'A/B'
