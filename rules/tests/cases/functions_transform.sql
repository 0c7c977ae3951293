-- iot-sql-functions, transform(): with 'enrichArray', each Object of the Array with the
-- attributes of the Object added; any other mode is Undefined. The page's examples 1 and 2
-- (written there with SELECT VALUE, which sitegate does not have yet; here as a key).
-- input: {"topic":"A/B","thing":"d","payload":{"attributes":{"data1":1,"data2":2},"values":[{"a":3},{"b":4},{"c":5}]},"ts":1}
-- expect out: {"r1":[{"a":3,"data1":1,"data2":2},{"b":4,"data1":1,"data2":2},{"c":5,"data1":1,"data2":2}],"r2":[{"a":3,"key":1},{"b":4,"key":1},{"c":5,"key":1}],"@left_out":["other","not_array"]}
INSERT INTO out SELECT transform("enrichArray", attributes, values) AS r1,
       transform("enrichArray", {"key": attributes.data1}, values) AS r2,
       transform('other', attributes, values) AS other,
       transform('enrichArray', attributes, attributes) AS not_array
FROM 'A/B'
