-- Inputs and expectations in separate files: separate_files.input.jsonl, separate_files.expected.jsonl.
INSERT INTO out SELECT thing_name() AS who, v FROM 'x/+' WHERE v >= 2
