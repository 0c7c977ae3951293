-- iot-sql-functions: the string functions take any value in its standard string form:
-- length("hi") = 2, length(false) = 5, lower("HELLO") = "hello", lower(["HELLO"]) =
-- "[\"hello\"]" (the Array's JSON, as a String), lpad(1, 3) = "   1", numbytes("€") = 3,
-- indexof("abcd", "bc") = 1, md5("hello") = "5d41402abc4b2a76b9719d911017c592".
-- input: {"topic":"x","thing":"d","payload":{"words":["HELLO"],"n":12.5},"ts":1}
-- expect out: {"a":2,"b":5,"c":"hello","d":"[\"hello\"]","e":"   1","f":3,"g":1,"h":"5d41402abc4b2a76b9719d911017c592","i":"12.5","j":"TRUE","k":4}
INSERT INTO out SELECT
  length("hi") AS a,
  length(false) AS b,
  lower("HELLO") AS c,
  lower(words) AS d,
  lpad(1, 3) AS e,
  numbytes("€") AS f,
  indexof("abcd", "bc") AS g,
  md5("hello") AS h,
  lower(n) AS i,
  upper(true) AS j,
  length(n) AS k
FROM 'x'
