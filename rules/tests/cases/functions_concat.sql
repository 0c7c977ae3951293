-- iot-sql-functions, concat(): the page's examples. concat([1, 2, 3], 4) = [1, 2, 3, 4];
-- concat([1, 2, 3], "hello") = [1, 2, 3, "hello"]; concat("con", "cat") = "concat";
-- concat(1, "hello") = "1hello"; concat("he", "is", "man") = "heisman";
-- concat([1, 2, 3], "hello", [4, 5, 6]) = [1, 2, 3, "hello", 4, 5, 6]. One argument is
-- "returned unmodified" (the table; its example concat(1) = "1" disagrees, the table is
-- followed: concat(n) is n).
-- input: {"topic":"x","thing":"d","payload":{"a":[1,2,3],"b":[4,5,6],"n":7},"ts":1}
-- expect out: {"p":[1,2,3,4],"q":[1,2,3,"hello"],"r":"concat","s":"1hello","t":"heisman","u":[1,2,3,"hello",4,5,6],"v":7,"w":"7x"}
INSERT INTO out SELECT
  concat(a, 4) AS p,
  concat(a, "hello") AS q,
  concat("con", "cat") AS r,
  concat(1, "hello") AS s,
  concat("he", "is", "man") AS t,
  concat(a, "hello", b) AS u,
  concat(n) AS v,
  concat(n, 'x') AS w
FROM 'x'
