-- iot-sql-operators: `>`, `<`, `>=`, `<=` convert both operands to Decimal and compare them
-- (the page's text), so '2' < '10' is true and a string field holding a number compares as
-- one; an operand that does not convert gives Undefined (left out). `=` and `<>` compare values
-- of one type: 5 = '5' is false (strings and numbers are different types), 5 = 5.0 is true
-- (both numbers).
-- input: {"topic":"x","thing":"d","payload":{"level":"12","name":"pump"},"ts":1}
-- expect out: {"a":true,"b":true,"c":false,"d":true,"e":true,"f":true,"g":true,"h":false}
-- left out: undefined_left_out
INSERT INTO out SELECT
  '2' < '10' AS a,
  level > 9 AS b,
  5 = '5' AS c,
  5 <> '5' AS d,
  5 = 5.0 AS e,
  name = "pump" AS f,
  level >= '12' AS g,
  level < 12 AS h,
  name > 1 AS undefined_left_out
FROM 'x'
WHERE level > 10
