-- One summary per freezer per minute instead of every reading: fewer, cheaper cloud records.
INSERT INTO archive
SELECT thing_name() AS thing, count(*) AS readings, avg(temp) AS avg_temp,
       min(temp) AS min_temp, max(temp) AS max_temp, last(temp) AS last_temp
FROM 'dt/+/freezer'
GROUP BY thing_name(), TUMBLE(INTERVAL '1' MINUTE)
