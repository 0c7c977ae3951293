-- iot-sql-functions, get(): the item at a 0-based index of an Array (index converted to Int),
-- the character at a 0-based index of a String, the value under a String key of an Object (no
-- conversion); Undefined out of bounds or for any other type. The page's examples
-- get(["a","b","c"], 1) = "b" and get({"a":"b"}, "a") = "b" are taken from payload fields.
-- The page's get("abc", 1) = "a" disagrees with its table (0-based index); the table is
-- followed: "b".
-- input: {"topic":"x","thing":"d","payload":{"arr":["a","b","c"],"obj":{"a":"b","n":{"x":[5]}},"s":"abc","i":1.7},"ts":1}
-- expect out: {"arr1":"b","obja":"b","str1":"b","by_field":"b","by_string":"b","nested":[5],"@left_out":["past","negative","num_key","scalar"]}
INSERT INTO out SELECT get(arr, 1) AS arr1, get(obj, 'a') AS obja, get(s, 1) AS str1,
       get(arr, i) AS by_field, get(arr, '1') AS by_string, get(get(obj, 'n'), 'x') AS nested,
       get(arr, 3) AS past, get(arr, -1) AS negative, get(obj, 1) AS num_key,
       get(5, 0) AS scalar
FROM 'x'
