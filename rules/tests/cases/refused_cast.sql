-- iot-sql-functions, cast(): the keywords after "as" are String, Nvarchar, Text, Ntext,
-- varchar, Int, Integer, Double, and (SQL version 2016-03-23) Decimal, Bool, Boolean. Any other
-- type is refused at load, naming the ones there are.
-- expect-error: cast() takes one of these types after AS: String, Nvarchar
INSERT INTO out SELECT cast(v AS TIMESTAMP) AS d FROM 'x'
