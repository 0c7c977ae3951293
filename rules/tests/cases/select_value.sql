-- iot-sql-select: SELECT VALUE outputs the value itself, not an object. The page's example:
-- {"color":"red","temperature":50} with SELECT VALUE color gives "red". With SQL version
-- 2016-03-23 an array (or an object) is output as the top-level value too. A message whose
-- value is Undefined gives no output.
-- input: {"topic":"topic/subtopic","thing":"d","payload":{"color":"red","temperature":50},"ts":1}
-- input: {"topic":"topic/subtopic","thing":"d","payload":{"temperature":51},"ts":2}
-- expect scalar: "red"
-- expect list: ["red",50]
-- expect list: [51]
INSERT INTO scalar SELECT VALUE color FROM 'topic/subtopic';
INSERT INTO list SELECT VALUE [color, temperature] FROM 'topic/subtopic'
