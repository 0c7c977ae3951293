-- iot-substitution-templates evaluates an expression against each message; a windowed
-- statement's row comes from many, so a template expression other than a field name of the
-- output is refused at load for its sink (a field name is read from the output row).
-- template stats: s/${upper(zone)}
-- expect-error: sink "stats": its template's `${upper(zone)}` is evaluated against each message
INSERT INTO stats SELECT count(*) AS n FROM 'x' GROUP BY TUMBLE(INTERVAL '1' MINUTE)
