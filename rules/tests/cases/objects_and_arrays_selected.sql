-- iot-sql-select and iot-sql-data-types: a field holding an object or an array is a value;
-- selected, it is output as that JSON (an object stays an object, an array an array with its
-- nulls), not as a string and not dropped. A nested field of it can be selected beside it.
-- SELECT * keeps an array as it came.
-- input: {"topic":"x","thing":"d","payload":{"state":{"reported":{"t":1,"on":true},"desired":{"t":2}},"v":[1,"a",null,{"k":[2]}]},"ts":1}
-- expect out: {"state":{"reported":{"t":1,"on":true},"desired":{"t":2}},"v":[1,"a",null,{"k":[2]}],"t":1,"r":{"t":1,"on":true}}
-- expect all: {"state":{"reported":{"t":1,"on":true},"desired":{"t":2}},"v":[1,"a",null,{"k":[2]}]}
INSERT INTO out SELECT state, v, state.reported.t AS t, state.reported AS r FROM 'x';
INSERT INTO all SELECT * FROM 'x'
