-- iot-sql-operators, - * / % operators: two Ints give an Int (7 / 2 = 3, 7 % 2 = 1);
-- Int/Decimal operands give a Decimal; Strings are converted to Decimals ("4" * 2 = 8.0,
-- output as 8 by SQL version 2016-03-23); a String that does not convert, a Boolean, or a zero
-- divisor gives Undefined, for that message only (no error record). `-x` is 0 - x.
-- input: {"topic":"x","thing":"d","payload":{"i":7,"j":2,"d":2.5,"s":"4","x":"abc","z":0,"b":true},"ts":1}
-- expect out: {"sub":5,"mul":14,"div":3,"mod":1,"sub_d":4.5,"mul_d":5,"div_d":2.8,"mod_d":2,"mul_s":8,"sub_s":3,"div_s":1.75,"mod_s":3,"neg":-7,"neg_d":-2.5,"neg_s":-4}
-- left out: text_times_two, by_zero, mod_zero, bool_times_two, missing
INSERT INTO out SELECT
  i - j AS sub,
  i * j AS mul,
  i / j AS div,
  i % j AS mod,
  i - d AS sub_d,
  d * j AS mul_d,
  i / d AS div_d,
  i % d AS mod_d,
  s * j AS mul_s,
  s - 1 AS sub_s,
  i / s AS div_s,
  i % s AS mod_s,
  -i AS neg,
  -d AS neg_d,
  -s AS neg_s,
  x * 2 AS text_times_two,
  i / z AS by_zero,
  i % z AS mod_zero,
  b * 2 AS bool_times_two,
  i - nothing AS missing
FROM 'x'
