-- iot-sql-operators, = and <> operators: Arrays are equal when their items are equal and in the
-- same order; Objects when their keys and values are equal, in any order; values of different
-- types (an Array and the String of its JSON) are unequal.
-- input: {"topic":"x","thing":"d","payload":{"a":[1,2],"b":[1,2],"c":[2,1],"o":{"x":1,"y":2},"p":{"y":2,"x":1},"s":"[1,2]"},"ts":1}
-- expect out: {"same_array":true,"other_order":false,"same_object":true,"differs":true,"array_is_not_text":false,"object_differs":false}
INSERT INTO out SELECT
  a = b AS same_array,
  a = c AS other_order,
  o = p AS same_object,
  a <> c AS differs,
  a = s AS array_is_not_text,
  o <> p AS object_differs
FROM 'x'
