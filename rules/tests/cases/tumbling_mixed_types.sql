-- A window's sum, avg, min and max over a field whose values have several types (a number in
-- one message, a numeric string or a word in another): the values are taken as Decimals, as
-- IoT SQL's arithmetic converts strings (iot-sql-operators), and a value that is no number is
-- skipped. max() of 9 and "10" is 10, not the text order's "9".
-- input: {"topic":"x","thing":"d","payload":{"t":9},"ts":1000}
-- input: {"topic":"x","thing":"d","payload":{"t":"10"},"ts":2000}
-- input: {"topic":"x","thing":"d","payload":{"t":"warm"},"ts":3000}
-- expect out: {"thing":"d","total":19,"mean":9.5,"low":9,"high":10,"n":3}
INSERT INTO out SELECT thing_name() AS thing, sum(t) AS total, avg(t) AS mean, min(t) AS low,
       max(t) AS high, count(*) AS n
FROM 'x' GROUP BY thing_name(), TUMBLE(INTERVAL '1' MINUTE)
