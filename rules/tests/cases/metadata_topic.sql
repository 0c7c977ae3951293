-- topic() and topic(n).
-- input: {"topic":"site/plant-7/line-2/temp","thing":"t-1","payload":{},"ts":1}
-- expect out: {"whole":"site/plant-7/line-2/temp","second":"plant-7","fourth":"temp"}
INSERT INTO out SELECT topic() AS whole, topic(2) AS second, topic(4) AS fourth FROM 'site/#'
