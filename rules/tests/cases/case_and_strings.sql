-- CASE, arithmetic, isUndefined() and string functions.
-- input: {"topic":"dt/door-1/evt","thing":"door-1","payload":{"state":"open","secs":95},"ts":1}
-- input: {"topic":"dt/door-2/evt","thing":"door-2","payload":{"state":"closed"},"ts":2}
-- expect doors: {"door":"DOOR-1","minutes":1.5833333333333333,"level":"warn","missing_secs":false}
-- expect doors: {"door":"DOOR-2","level":"ok","missing_secs":true}
INSERT INTO doors
SELECT upper(thing_name()) AS door,
       secs / 60.0 AS minutes,
       CASE WHEN state = 'open' AND secs > 60 THEN 'warn' ELSE 'ok' END AS level,
       isUndefined(secs) AS missing_secs
FROM 'dt/+/evt'
