-- timestamp() is the gateway's receive time in ms.
-- input: {"topic":"x","thing":"d","payload":{},"ts":1700000000123}
-- expect out: {"at":1700000000123}
INSERT INTO out SELECT timestamp() AS at FROM 'x'
