-- iot-sql-functions, trunc(): the page's examples trunc(2.3, 0) = 2, trunc(2.3123, 2) = 2.31,
-- trunc(2.888, 2) = 2.88, trunc(2.00, 5) = 2; an Int is returned as it is; a String converts
-- to a Decimal; places below 0 are 0; a non-numeric places is Undefined.
-- input: {"topic":"x","thing":"d","payload":{"s":"-7.456"},"ts":1}
-- expect out: {"a":2,"b":2.31,"c":2.88,"d":2,"int":17,"str":-7.4,"neg":2,"@left_out":["bad"]}
INSERT INTO out SELECT trunc(2.3, 0) AS a, trunc(2.3123, 2) AS b, trunc(2.888, 2) AS c,
       trunc(2.00, 5) AS d, trunc(17, 1) AS int, trunc(s, 1) AS str, trunc(2.9, -3) AS neg,
       trunc(2.5, 'x') AS bad
FROM 'x'
