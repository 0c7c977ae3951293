-- iot-sql-data-types: Null ("a JSON null", and what `SELECT NULL AS n` creates) and Undefined
-- (a field the payload lacks) are different values. A Null is output as null; an Undefined
-- result leaves its key out.
-- iot-sql-functions, isNull(): true only for Null; isUndefined(): true only for Undefined
-- (the pages' examples isNull(5) = false, isUndefined(5) = false).
-- input: {"topic":"x","thing":"d","payload":{"v":null,"w":3},"ts":1}
-- expect out: {"v":null,"n":null,"w":3,"vnull":true,"vundef":false,"mnull":false,"mundef":true,"nnull":true,"five_null":false,"five_undef":false,"@left_out":["m"]}
INSERT INTO out SELECT v, NULL AS n, w, m, isNull(v) AS vnull, isUndefined(v) AS vundef,
       isNull(m) AS mnull, isUndefined(m) AS mundef, isNull(NULL) AS nnull,
       isNull(5) AS five_null, isUndefined(5) AS five_undef
FROM 'x'
