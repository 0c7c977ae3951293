-- iot-sql-case: the matching branch's expression is the result, with its own type (an Int
-- stays an Int beside a String branch); no match and no ELSE is Undefined, and so is an
-- Undefined v ("If v is Undefined, the result of the case statement is Undefined"); a branch
-- may give Null. The page's example: color "yellow" gives {"instructions":"caution"}.
-- input: {"topic":"topic/subtopic","thing":"d","payload":{"color":"yellow","n":2},"ts":1}
-- input: {"topic":"topic/subtopic","thing":"d","payload":{"color":"blue"},"ts":2}
-- expect out: {"instructions":"caution","num":20,"nul":null,"@left_out":["none"]}
-- expect out: {"instructions":"you are not at a stop light","nul":"x","@left_out":["num","none"]}
INSERT INTO out SELECT CASE color WHEN 'green' THEN 'go' WHEN 'yellow' THEN 'caution' WHEN 'red' THEN 'stop' ELSE 'you are not at a stop light' END as instructions,
       CASE n WHEN 2 THEN 20 ELSE 'other' END AS num,
       CASE WHEN n = 2 THEN NULL ELSE 'x' END AS nul,
       CASE color WHEN 'pink' THEN 1 END AS none
FROM 'topic/subtopic'
