-- iot-sql-functions, time_to_epoch(): parsing JDK date/time patterns is not done at the edge
-- yet; refused at load rather than answered with another meaning.
-- expect-error: time_to_epoch() is not supported at the edge yet
INSERT INTO out SELECT time_to_epoch(v, 'yyyy') AS u FROM 'x'
