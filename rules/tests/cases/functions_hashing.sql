-- iot-sql-functions, Hashing functions: md5, sha1, sha224, sha256, sha384, sha512 of a string,
-- as lowercase hex. Expected values are the standard digests of "hello world" (checked with
-- Python's hashlib, not with this engine).
-- input: {"topic":"x","thing":"d","payload":{"s":"hello world"},"ts":1}
-- expect out: {"md5":"5eb63bbbe01eeed093cb22bb8f5acdc3","sha1":"2aae6c35c94fcfb415dbe95f408b9ce91ee846ed","sha224":"2f05477fc24bb4faefd86517156dafdecec45b8ad3cf2522a563582b","sha256":"b94d27b9934d3e08a52e52d7da7dabfac484efe37a5380ee9088f7ace2efcde9","sha384":"fdbd8e75a67f29f701a4e040385e2e23986303ea10239211af907fcbb83578b3e417cb71ce646efd0819dd8c088de1bd","sha512":"309ecc489c12d6eb4cc40f50c902f2b4d0ed77ee511a7c7a9bcd3ca86d4cd86f989dd35bc5ff499670da34255b45b0cfd830e81f605dcf7dc5542e93ae9cd76f"}
INSERT INTO out SELECT md5(s) AS md5, sha1(s) AS sha1, sha224(s) AS sha224, sha256(s) AS sha256, sha384(s) AS sha384, sha512(s) AS sha512 FROM 'x'
