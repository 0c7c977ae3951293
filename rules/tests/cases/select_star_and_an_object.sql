-- iot-sql-select: `SELECT *, 15 as speed` adds items to the payload (the page's example), and
-- an object field selected beside `*` is that object.
-- input: {"topic":"topic/subtopic","thing":"d","payload":{"color":"red","temperature":50,"state":{"on":true}},"ts":1}
-- expect out: {"color":"red","temperature":50,"state":{"on":true},"speed":15,"s":{"on":true}}
INSERT INTO out SELECT *, 15 as speed, state AS s FROM 'topic/subtopic'
