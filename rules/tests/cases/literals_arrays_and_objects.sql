-- Array and Object literals, as the functions page writes them in its examples
-- (iot-sql-functions): get(["a", "b", "c"], 1) = "b"; get({"a":"b"}, "a") = "b";
-- isUndefined(floor([1,2,3])) = true; concat([1, 2, 3], 4) = [1, 2, 3, 4]. Literals are values
-- like any other: selected, they are output as JSON, with their items' own types.
-- input: {"topic":"x","thing":"d","payload":{"t":5},"ts":1}
-- expect out: {"g1":"b","g2":"b","u":true,"c":[1,2,3,4],"arr":[1,"two",null,[true],{"t":5}],"obj":{"k":[1],"t":5,"n":null}}
INSERT INTO out SELECT get(["a", "b", "c"], 1) AS g1, get({"a":"b"}, "a") AS g2,
       isUndefined(floor([1,2,3])) AS u, concat([1, 2, 3], 4) AS c,
       [1, 'two', NULL, [true], {'t': t}] AS arr, {'k': [1], 't': t, 'n': NULL} AS obj
FROM 'x'
