-- iot-sql-functions, replace(String, String, String): every occurrence of the second argument
-- in the first is replaced with the third. The page's examples replace("abcd", "bc", "x") =
-- "axd" and replace("abcdabcd", "b", "x") = "axcdaxcd". "All arguments": an Int, Decimal,
-- Boolean, Array or Object is its string form; a Null or Undefined argument gives Undefined.
-- input: {"topic":"x","thing":"d","payload":{"s":"a-b-c","n":1201,"b":true,"z":null},"ts":1}
-- input: {"topic":"x","thing":"d","payload":{"s":7,"n":"1201","b":"true","z":null},"ts":2}
-- expect out: {"page1":"axd","page2":"axcdaxcd","dashes":"a b c","int":"1x01","bool":"tRUE","array":"[9,2]","@left_out":["null_arg","missing"]}
-- expect out: {"page1":"axd","page2":"axcdaxcd","dashes":"7","int":"1x01","bool":"tRUE","array":"[9,2]","@left_out":["null_arg","missing"]}
INSERT INTO out SELECT
  replace("abcd", "bc", "x") AS page1,
  replace("abcdabcd", "b", "x") AS page2,
  replace(s, '-', ' ') AS dashes,
  replace(n, 2, 'x') AS int,
  replace(upper(b), "T", 't') AS bool,
  replace([1,2], 1, 9) AS array,
  replace(s, z, "x") AS null_arg,
  replace(s, nothing, "x") AS missing
FROM 'x'
