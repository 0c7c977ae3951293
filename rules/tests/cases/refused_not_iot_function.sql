-- A DataFusion function that IoT SQL does not have is refused at load, not run with its
-- DataFusion meaning (iot-sql-functions lists every function).
-- expect-error: date_trunc() is not an AWS IoT SQL function
INSERT INTO out SELECT date_trunc('hour', v) AS h FROM 'x'
