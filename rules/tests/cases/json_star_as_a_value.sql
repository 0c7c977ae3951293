-- iot-sql-json, "* Operator": `*` "creates a new JSON object containing the message data", so
-- `get(*, key)` reads a field by its name. The page uses `get` for names the `.` operator
-- cannot reach: its example get(get(get(mydata,"item2"),"0"),"my-key") = "myValue" is the
-- WHERE here, and `get(*, 'my-key')` the same name at the top level. A field named like an
-- SQL word (`order`, `end`, `when`) is read the same way (fields_named_like_sql_words.sql).
-- A payload that is not JSON: json_star_not_json.sql.
-- input: {"topic":"x","thing":"d","payload":{"order":7,"end":"x","when":[1],"my-key":true,"mydata":{"item2":{"0":{"my-key":"myValue"}}}},"ts":1}
-- input: {"topic":"x","thing":"d","payload":{"order":8,"mydata":{"item2":{"0":{"my-key":"other"}}}},"ts":2}
-- expect out: {"order":7,"end":"x","when":[1],"hyphen":true,"whole":{"order":7,"end":"x","when":[1],"my-key":true,"mydata":{"item2":{"0":{"my-key":"myValue"}}}}}
-- expect all: {"order":7}
-- expect all: {"order":8}
INSERT INTO out SELECT get(*, 'order') AS order, get(*, 'end') AS end, get(*, 'when') AS "when",
       get(*, 'my-key') AS hyphen, get(*, 'missing') AS missing, concat(*) AS whole
FROM 'x' WHERE get(get(get(mydata, "item2"), "0"), "my-key") = "myValue";
INSERT INTO all SELECT get(*, 'order') AS order FROM 'x'
