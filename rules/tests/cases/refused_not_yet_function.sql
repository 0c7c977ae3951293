-- iot-sql-functions lists get_or_default(expression, defaultValue), but the page's text this
-- engine follows does not say what it gives (does a Null take the default?), so it is refused
-- at load rather than answered with a guessed meaning; the reason points to nanvl().
-- expect-error: get_or_default() is not supported at the edge yet: the functions page lists it without its semantics
INSERT INTO out SELECT get_or_default(v, 1) AS u FROM 'x'
