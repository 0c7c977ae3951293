-- iot-sql-json: a name `.` cannot reach is read with `get`. A bare SQL word where a field would
-- be (`order`) is refused at load, and the reason says how to read that field:
-- get(*, 'order') (json_star_as_a_value.sql).
-- expect-error: 'order' is an SQL word here, not a field; a payload field of that name is read as get(*, 'order')
INSERT INTO out SELECT order FROM 'x'
