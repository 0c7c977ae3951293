-- newuuid() gives a fresh id per row (36 characters).
-- input: {"topic":"x","thing":"d","payload":{},"ts":1}
-- expect out: {"n":36}
INSERT INTO out SELECT length(newuuid()) AS n FROM 'x'
