-- iot-sql-functions, time_to_epoch(timestamp, pattern): JDK 11 DateTimeFormatter patterns;
-- a timestamp without a zone is UTC. The page's three examples:
-- ("2020-04-03 09:45:18 UTC+01:00", "yyyy-MM-dd HH:mm:ss VV") = 1585903518000,
-- ("18 December 2015", "dd MMMM yyyy") = 1450396800000,
-- ("2007-12-03 10:15:30.592 America/Los_Angeles", "yyyy-MM-dd HH:mm:ss.SSS z") = 1196705730592.
-- A text that does not match the pattern is Undefined. parse_time() reads the result back.
-- input: {"topic":"x","thing":"d","payload":{"stamp":"2016-12-15T18:07:31.155Z"},"ts":1}
-- expect out: {"a":1585903518000,"b":1450396800000,"c":1196705730592,"field":1481825251155,"back":"2016-12-15 18:07","@left_out":["bad"]}
INSERT INTO out SELECT time_to_epoch("2020-04-03 09:45:18 UTC+01:00", "yyyy-MM-dd HH:mm:ss VV") AS a,
       time_to_epoch("18 December 2015", "dd MMMM yyyy") AS b,
       time_to_epoch("2007-12-03 10:15:30.592 America/Los_Angeles", "yyyy-MM-dd HH:mm:ss.SSS z") AS c,
       time_to_epoch(stamp, "yyyy-MM-dd'T'HH:mm:ss.SSSX") AS field,
       parse_time("yyyy-MM-dd HH:mm", time_to_epoch(stamp, "yyyy-MM-dd'T'HH:mm:ss.SSSX")) AS back,
       time_to_epoch("yesterday", "yyyy-MM-dd") AS bad
FROM 'x'
