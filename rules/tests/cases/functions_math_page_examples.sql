-- iot-sql-functions, the math functions' examples: abs(-5) = 5 (an Int stays an Int),
-- acos(0) = 1.5707963267948966, asin(0) = 0.0, atan(0) = 0.0, atan2(1, 0) = 1.5707963267948966,
-- cos(0) = 1, cosh(2.3) = 5.037220649268761, exp(1) = e, ln(e) = 1, log(100) = 2.0 (base 10),
-- power(2, 5) = 32.0 (whole-number Decimals output as Ints, iot-sql-data-types).
-- iot-sql-data-types, "Conversions": abs("-5.123") is treated as abs(-5.123); a string that
-- does not convert, a Boolean, and an imaginary result (acos(2), sqrt(-1), ln(0)) are Undefined.
-- input: {"topic":"x","thing":"d","payload":{"t":"-5.123","b":true,"x":"abc"},"ts":1}
-- expect out: {"abs":5,"acos":1.5707963267948966,"asin":0,"atan":0,"atan2":1.5707963267948966,"cos":1,"cosh":5.037220649268761,"exp":2.718281828459045,"ln":1,"log":2,"power":32,"abs_text":5.123,"sqrt_text":2,"sin":0,"sinh":0,"tan":0,"tanh":0}
-- left out: abs_bool, abs_word, acos_2, sqrt_neg, ln_0
INSERT INTO out SELECT
  abs(-5) AS abs,
  acos(0) AS acos,
  asin(0) AS asin,
  atan(0) AS atan,
  atan2(1, 0) AS atan2,
  cos(0) AS cos,
  cosh(2.3) AS cosh,
  exp(1) AS exp,
  ln(exp(1)) AS ln,
  log(100) AS log,
  power(2, 5) AS power,
  abs(t) AS abs_text,
  sqrt('4') AS sqrt_text,
  sin(0) AS sin,
  sinh(0) AS sinh,
  tan(0) AS tan,
  tanh(0) AS tanh,
  abs(b) AS abs_bool,
  abs(x) AS abs_word,
  acos(2) AS acos_2,
  sqrt(-1) AS sqrt_neg,
  ln(0) AS ln_0
FROM 'x'
