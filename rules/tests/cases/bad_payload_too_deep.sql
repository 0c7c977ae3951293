-- Nesting deeper than 16 levels goes to the error sink.
-- input: {"topic":"x","thing":"d","payload":{"a":{"b":{"c":{"d":{"e":{"f":{"g":{"h":{"i":{"j":{"k":{"l":{"m":{"n":{"o":{"p":{"q":1}}}}}}}}}}}}}}}}},"ts":1}
-- expect errors: {"reason":"payload nests deeper than 16 levels"}
INSERT INTO out SELECT * FROM 'x'
