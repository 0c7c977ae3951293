-- iot-substitution-templates: a template expression is IoT SQL like a select item, so what
-- a select item may not do is refused at load for the sink's template too, naming the sink
-- and the expression: here a function that calls another AWS service.
-- template out: t/${get_thing_shadow('x', 'y')}
-- expect-error: sink "out": its template's `${get_thing_shadow('x', 'y')}`: get_thing_shadow() calls
INSERT INTO out SELECT a FROM 'x'
