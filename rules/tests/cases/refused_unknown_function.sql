-- A rule calling a function that does not exist is refused with its name.
-- expect-error: nosuchfunction
INSERT INTO out SELECT nosuchfunction(v) FROM 'x'
