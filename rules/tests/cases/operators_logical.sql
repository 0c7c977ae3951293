-- iot-sql-operators, AND, OR and NOT: Boolean operands, or the strings "true" and "false" in
-- any case, which are converted to Booleans; any other operand gives Undefined (left out).
-- input: {"topic":"x","thing":"d","payload":{"on":"TRUE","n":5},"ts":1}
-- expect out: {"a":true,"b":false,"c":true,"d":true,"e":false}
-- left out: undefined_number, undefined_text
INSERT INTO out SELECT
  on AND true AS a,
  'false' OR false AS b,
  NOT 'false' AS c,
  true OR 'False' AS d,
  NOT on AS e,
  n AND true AS undefined_number,
  NOT 'yes' AS undefined_text
FROM 'x'
WHERE on AND n > 1
