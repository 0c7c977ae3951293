-- iot-sql-functions: startswith(String, String), endswith(String, String), indexof(String,
-- String) (0-based, -1 when absent), numbytes(String) (UTF-8 bytes), chr(Int) (the ASCII
-- character), and trim/ltrim/rtrim. Examples from the page: startswith("ranger", "ran") = true,
-- endswith("cat", "at") = true, indexof("abcd", "bc") = 1, numbytes("IoT") = 3, chr(65) = "A".
-- input: {"topic":"x","thing":"d","payload":{"word":"señor"},"ts":1}
-- expect out: {"s":true,"s2":false,"e":true,"i":1,"i2":-1,"i3":2,"n":3,"n2":6,"c":"A","t":"hi","l":"hi  ","r":"  hi"}
INSERT INTO out SELECT
  startswith("ranger", "ran") AS s,
  startswith("ranger", "ger") AS s2,
  endswith("cat", "at") AS e,
  indexof("abcd", "bc") AS i,
  indexof("abcd", "x") AS i2,
  indexof(word, "ñ") AS i3,
  numbytes("IoT") AS n,
  numbytes(word) AS n2,
  chr(65) AS c,
  trim("  hi  ") AS t,
  ltrim("  hi  ") AS l,
  rtrim("  hi  ") AS r
FROM 'x'
