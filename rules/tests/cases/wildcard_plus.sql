-- '+' matches exactly one level.
-- input: {"topic":"dt/a/temp","thing":"a","payload":{"v":1},"ts":1}
-- input: {"topic":"dt/a/b/temp","thing":"a","payload":{"v":2},"ts":2}
-- expect out: {"v":1}
INSERT INTO out SELECT v FROM 'dt/+/temp'
