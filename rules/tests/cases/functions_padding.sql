-- iot-sql-functions, lpad(String, Int) and rpad(String, Int): the String padded with as many
-- spaces as the Int says (clamped to 0…1000), on the left or the right; a number is its string
-- form. The page's examples: lpad("hello", 2) = "  hello", lpad(1, 3) = "   1".
-- input: {"topic":"x","thing":"d","payload":{"n":3},"ts":1}
-- expect out: {"a":"  hello","b":"   1","c":"hello  ","d":"1   ","e":"hello","f":"   x"}
INSERT INTO out SELECT
  lpad("hello", 2) AS a,
  lpad(1, 3) AS b,
  rpad("hello", 2) AS c,
  rpad(1, 3) AS d,
  lpad("hello", -3) AS e,
  lpad('x', n) AS f
FROM 'x'
