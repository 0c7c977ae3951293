-- CASE, arithmetic, isUndefined() and string functions. iot-sql-data-types: with SQL V2
-- (2016-03-23) a whole number such as 60.0 is processed as an Int, so secs / 60.0 divides two
-- Ints (95 / 60 = 1), and secs / 60.5 is a Decimal division.
-- input: {"topic":"dt/door-1/evt","thing":"door-1","payload":{"state":"open","secs":95},"ts":1}
-- input: {"topic":"dt/door-2/evt","thing":"door-2","payload":{"state":"closed"},"ts":2}
-- expect doors: {"door":"DOOR-1","minutes":1,"exact":1.5702479338842976,"level":"warn","missing_secs":false}
-- expect doors: {"door":"DOOR-2","level":"ok","missing_secs":true}
INSERT INTO doors
SELECT upper(thing_name()) AS door,
       secs / 60.0 AS minutes,
       secs / 60.5 AS exact,
       CASE WHEN state = 'open' AND secs > 60 THEN 'warn' ELSE 'ok' END AS level,
       isUndefined(secs) AS missing_secs
FROM 'dt/+/evt'
