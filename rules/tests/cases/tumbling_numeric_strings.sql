-- A window's sum and avg over numeric strings add them as Decimals (iot-sql-operators: strings
-- convert to Decimal in arithmetic); min and max of strings compare them as text.
-- input: {"topic":"x","thing":"d","payload":{"t":"7","s":"b"},"ts":1000}
-- input: {"topic":"x","thing":"d","payload":{"t":"3.5","s":"a"},"ts":2000}
-- expect out: {"thing":"d","total":10.5,"mean":5.25,"first_s":"a","last_s":"b"}
INSERT INTO out SELECT thing_name() AS thing, sum(t) AS total, avg(t) AS mean, min(s) AS first_s,
       max(s) AS last_s
FROM 'x' GROUP BY thing_name(), TUMBLE(INTERVAL '1' MINUTE)
