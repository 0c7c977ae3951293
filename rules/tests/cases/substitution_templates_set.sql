-- iot-sql-set: "Reference these variables in SELECT and WHERE clauses, and in action
-- substitution templates". The sink's template reads the statement's `@celsius`, set from the
-- original message's `f` (the page's conversion, with Int / Int an Int as the operators page
-- has it: set_clause.sql); a variable the statement does not set is refused at load
-- (refused_template_unset_variable.sql).
-- template out: t/${@celsius}/${@celsius > 20}
-- input: {"topic":"x","thing":"d","payload":{"f":75},"ts":1}
-- expect out: {"c":23,"@templates":["23","true"]}
INSERT INTO out SET @celsius = (f - 32) * 5 / 9 SELECT @celsius AS c FROM 'x'
