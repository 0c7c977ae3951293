-- iot-sql-functions, sql_version(): the SQL version of the rule; sitegate implements 2016-03-23
-- (the page's example gives "2016-03-23").
-- input: {"topic":"x","thing":"d","payload":{},"ts":1}
-- expect out: {"v":"2016-03-23"}
INSERT INTO out SELECT sql_version() AS v FROM 'x'
