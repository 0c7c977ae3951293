-- iot-sql-functions, substring(String, Int[, Int]): the page's examples, with its double-quoted
-- string literals. 0-based start (inclusive) and end (exclusive); a Decimal index is rounded
-- down; indices are clamped to the string; a non-string first argument is its string form; an
-- empty range gives "".
-- input: {"topic":"x","thing":"d","payload":{},"ts":1}
-- expect out: {"a":"012345","b":"2345","c":"2345","d":"3","e":"012345","f":"rue","g":"false","h":"12","i":"012345","j":""}
INSERT INTO out SELECT
  substring("012345", 0) AS a,
  substring("012345", 2) AS b,
  substring("012345", 2.745) AS c,
  substring(123, 2) AS d,
  substring("012345", -1) AS e,
  substring(true, 1.2) AS f,
  substring(false, -2.411E5) AS g,
  substring("012345", 1, 3) AS h,
  substring("012345", -50, 50) AS i,
  substring("012345", 3, 1) AS j
FROM 'x'
