-- LIKE and string equality.
-- input: {"topic":"x","thing":"d","payload":{"model":"FZ-200"},"ts":1}
-- input: {"topic":"x","thing":"d","payload":{"model":"TH-9"},"ts":2}
-- expect out: {"model":"FZ-200"}
INSERT INTO out SELECT model FROM 'x' WHERE model LIKE 'FZ-%'
