-- A tumbling one-minute window per device, by processing time, emitted when it closes.
-- input: {"topic":"dt/f-1/t","thing":"f-1","payload":{"temp":-20},"ts":60000}
-- input: {"topic":"dt/f-1/t","thing":"f-1","payload":{"temp":-10},"ts":70000}
-- input: {"topic":"dt/f-2/t","thing":"f-2","payload":{"temp":-5},"ts":80000}
-- input: {"topic":"dt/f-1/t","thing":"f-1","payload":{"temp":-30},"ts":130000}
-- expect stats: {"@thing":"f-1","thing":"f-1","n":2,"avg_temp":-15,"min_temp":-20,"max_temp":-10,"first_temp":-20,"last_temp":-10,"window_start":60000,"window_end":120000}
-- expect stats: {"@thing":"f-2","thing":"f-2","n":1,"avg_temp":-5,"window_start":60000,"window_end":120000}
-- expect stats: {"@thing":"f-1","n":1,"sum_temp":-30,"window_start":120000,"window_end":180000}
INSERT INTO stats
SELECT thing_name() AS thing, count(*) AS n, avg(temp) AS avg_temp, sum(temp) AS sum_temp,
       min(temp) AS min_temp, max(temp) AS max_temp, first(temp) AS first_temp, last(temp) AS last_temp
FROM 'dt/+/t'
GROUP BY thing_name(), TUMBLE(INTERVAL '1' MINUTE)
ORDER BY thing
