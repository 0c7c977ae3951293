-- BETWEEN and IN.
-- input: {"topic":"x","thing":"d","payload":{"t":5,"zone":"A"},"ts":1}
-- input: {"topic":"x","thing":"d","payload":{"t":50,"zone":"B"},"ts":2}
-- input: {"topic":"x","thing":"d","payload":{"t":7,"zone":"C"},"ts":3}
-- expect out: {"t":5}
INSERT INTO out SELECT t FROM 'x' WHERE t BETWEEN 0 AND 10 AND zone IN ('A', 'B')
