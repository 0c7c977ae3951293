-- iot-sql-functions: mod and remainder (mod(8, 3) = 2), sign (sign(-7) = -1), the bit
-- functions (bitand(13, 5) = 5, bitor(8, 5) = 13, bitxor(8, 5) = 13, bitnot(13) = -14), floor
-- and ceil returning an Int (floor(1.2) = 1, floor(-1.2) = -2, ceil(1.2) = 2, ceil(-1.2) = -1),
-- round to the nearest Int with a half rounded up (the page's text), power returning a
-- Decimal (8.0, output as 8: iot-sql-data-types, SQL version 2016-03-23 processes a
-- whole-number Decimal as an Int), abs keeping the type.
-- input: {"topic":"x","thing":"d","payload":{"n":-7,"d":2.5},"ts":1}
-- expect out: {"m":2,"r":2,"md":0.5,"s":-1,"s0":0,"s1":1,"ba":5,"bo":13,"bx":13,"bn":-14,"f":1,"f2":-2,"c":2,"c2":-1,"ro":1,"ro2":3,"ro3":2,"p":8,"a":7}
INSERT INTO out SELECT
  mod(8, 3) AS m,
  remainder(8, 3) AS r,
  mod(d, 2) AS md,
  sign(n) AS s,
  sign(0) AS s0,
  sign(d) AS s1,
  bitand(13, 5) AS ba,
  bitor(8, 5) AS bo,
  bitxor(8, 5) AS bx,
  bitnot(13) AS bn,
  floor(1.2) AS f,
  floor(-1.2) AS f2,
  ceil(1.2) AS c,
  ceil(-1.2) AS c2,
  round(1.2) AS ro,
  round(d) AS ro2,
  round(1.5) AS ro3,
  power(2, 3) AS p,
  abs(n) AS a
FROM 'x'
