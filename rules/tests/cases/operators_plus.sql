-- iot-sql-operators, + operator: a String on either side converts the other operand to its
-- string form and concatenates (so "10" + 1 is "101"); Int + Int is an Int; Int/Decimal with a
-- Decimal is a Decimal (2.5 + 2.5 = 5.0, output as 5 by SQL version 2016-03-23); any other pair
-- (a Boolean with a number, an Array) is Undefined, and so is anything with a missing field.
-- input: {"topic":"x","thing":"d","payload":{"s":"abc","i":5,"d":2.5,"b":true,"n":"10","arr":[1,2]},"ts":1}
-- expect out: {"a":"abc5","b":"5abc","c":"101","d":7,"e":7.5,"f":5,"g":"abctrue","h":"abc2.5","k":"xy","l":3}
-- left out: bool_and_number, array_and_number, missing
INSERT INTO out SELECT
  s + i AS a,
  i + s AS b,
  n + 1 AS c,
  i + 2 AS d,
  i + d AS e,
  d + d AS f,
  s + b AS g,
  s + d AS h,
  "x" + 'y' AS k,
  1 + 2 AS l,
  b + 1 AS bool_and_number,
  arr + 1 AS array_and_number,
  s + nothing AS missing
FROM 'x'
