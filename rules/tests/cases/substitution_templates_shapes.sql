-- iot-substitution-templates: a template is evaluated against the original message whatever
-- the statement outputs: `SELECT *` (the computed values never show in the payload) and
-- `SELECT VALUE` (iot-sql-select), whose output stays the value itself. A sink whose
-- statements compute nothing for it (`other`) gets no values. A payload that is not JSON:
-- substitution_templates_binary.sql.
-- template out: a/${upper(a)}/${get(*, 'order')}/${concat(topic(2), '-', b)}
-- template value: v/${a}
-- input: {"topic":"x/y","thing":"d","payload":{"a":"b","order":3,"b":[1]},"ts":1}
-- expect out: {"a":"b","order":3,"@left_out":["__sg_tpl_0"],"@templates":["B","3","[\"y\",\"-\",1]"]}
-- expect value: "b"
-- expect other: {"n":1,"@templates":[]}
INSERT INTO out SELECT * FROM 'x/#';
INSERT INTO value SELECT VALUE a FROM 'x/#';
INSERT INTO other SELECT 1 AS n FROM 'x/#'
