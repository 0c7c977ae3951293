-- iot-sql-functions: regexp_matches(String, String) says whether the string contains a
-- match; regexp_replace(String, String, String) replaces every match ($1 names a group);
-- regexp_substr(String, String) is the first match. regexp_substr("hihihello", "hel") = "hel"
-- is the page's example.
-- input: {"topic":"x","thing":"d","payload":{"s":"aaaa"},"ts":1}
-- expect out: {"m":true,"m2":false,"r":"axcdaxcd","r2":"[b][b]","sub":"hel","sub2":""}
INSERT INTO out SELECT
  regexp_matches(s, 'a{2,}') AS m,
  regexp_matches(s, 'b') AS m2,
  regexp_replace('abcdabcd', 'b', 'x') AS r,
  regexp_replace('bxb', '(b)x(b)', '[$1][$2]') AS r2,
  regexp_substr("hihihello", "hel") AS sub,
  regexp_substr("hihihello", "xyz") AS sub2
FROM 'x'
