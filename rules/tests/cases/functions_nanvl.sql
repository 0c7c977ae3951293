-- iot-sql-functions, nanvl(): the first argument unless it is Undefined, Null or NaN; then
-- the second. The page's example: nanvl(8, 3) = 8.
-- input: {"topic":"x","thing":"d","payload":{"v":null,"s":"x","o":{"k":1}},"ts":1}
-- expect out: {"page":8,"missing":3,"nul":"dflt","str_v":"x","obj_v":{"k":1}}
INSERT INTO out SELECT nanvl(8, 3) AS page, nanvl(m, 3) AS missing, nanvl(v, 'dflt') AS nul,
       nanvl(s, 1) AS str_v, nanvl(o, 1) AS obj_v
FROM 'x'
