-- Two statements over one source feed two sinks.
-- input: {"topic":"x","thing":"d","payload":{"t":5},"ts":1}
-- expect raw: {"t":5}
-- expect doubled: {"t2":10}
INSERT INTO raw SELECT t FROM 'x';
INSERT INTO doubled SELECT t * 2 AS t2 FROM 'x'
