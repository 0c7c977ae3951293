-- iot-sql-operators with a Null operand: `<>` Null/Null is false (so `=` is true); a Null and
-- a value of another type are "Mismatched Type" (= false, <> true); an Undefined operand gives
-- Undefined. Arithmetic, comparison and logic with Null are "Other Value": Undefined, and
-- iot-sql-data-types: Null has no string form, so `+` with a String is Undefined too.
-- input: {"topic":"x","thing":"d","payload":{"v":null,"s":"a"},"ts":1}
-- expect out: {"eq_null":true,"neq_null":false,"eq_five":false,"neq_five":true,"@left_out":["eq_missing","plus","concat","gt","both"]}
INSERT INTO out SELECT v = NULL AS eq_null, v <> NULL AS neq_null, v = 5 AS eq_five,
       v <> 5 AS neq_five, v = missing AS eq_missing, v + 1 AS plus, s + v AS concat,
       v > 0 AS gt, v AND true AS both
FROM 'x'
