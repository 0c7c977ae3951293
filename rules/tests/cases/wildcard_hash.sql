-- '#' matches the level and everything below.
-- input: {"topic":"dt","thing":"a","payload":{"v":1},"ts":1}
-- input: {"topic":"dt/a/b","thing":"a","payload":{"v":2},"ts":2}
-- input: {"topic":"other","thing":"a","payload":{"v":3},"ts":3}
-- expect out: {"v":1}
-- expect out: {"v":2}
INSERT INTO out SELECT v FROM 'dt/#'
