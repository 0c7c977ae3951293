-- iot-sql-functions, traceid(): "Returns the trace ID (UUID) of the MQTT message". The gateway
-- gives each message it takes for the rules a random version 4 UUID, the same for every rule
-- and statement that reads it (`rules::engine::tests::traceid_is_one_per_message`); here, its
-- form: 36 characters, version digit 4 at index 14.
-- input: {"topic":"x","thing":"d","payload":{},"ts":1}
-- expect out: {"n":36,"version":"4","same":true}
INSERT INTO out SELECT length(traceid()) AS n, substring(traceid(), 14, 15) AS version,
       traceid() = traceid() AS same FROM 'x'
