-- iot-sql-nested-queries with the operator tables inside (iot-sql-operators): a numeric string
-- compares as a Decimal, arithmetic by the tables, an item without the field is Undefined there
-- (not selected, and its key left out), `*` keeps the item. FROM an Object runs the query on
-- that object and gives its one result (iot-sql-functions, transform() example 3, which reads
-- `(select a, b from data2)` and `(select value c from data2)`). FROM anything else is
-- Undefined.
-- input: {"topic":"x","thing":"d","payload":{"e":[{"n":"a","v":"5"},{"n":"b","v":50},{"n":"c"}],"data2":{"a":"first attribute","b":"second attribute","c":[{"y":true},{"y":false}]},"s":"text"},"ts":1}
-- expect out: {"small":[{"n":"a","twice":10}],"all":[{"n":"a","v":"5"},{"n":"b","v":50},{"n":"c"}],"names":[{"n":"a","v":"5"},{"n":"b","v":50},{"n":"c"}],"obj":{"a":"first attribute","b":"second attribute"},"c":[{"y":true},{"y":false}],"enriched":[{"y":true,"a":"first attribute","b":"second attribute"},{"y":false,"a":"first attribute","b":"second attribute"}],"@left_out":["none"]}
INSERT INTO out SELECT (SELECT n, v * 2 AS twice FROM e WHERE v < 10) AS small,
       (SELECT * FROM e) AS all, (SELECT * FROM e WHERE n <> 'z') AS names,
       (select a, b from data2) AS obj, (select value c from data2) AS c,
       transform('enrichArray', (select a, b from data2), (select value c from data2)) AS enriched,
       (SELECT VALUE n FROM s) AS none
FROM 'x'
