-- clientid(), principal() and thing_name(); the record keeps the device's identity.
-- input: {"topic":"x","thing":"pump-3","cert_id":"abc123","payload":{},"ts":1}
-- expect out: {"@thing":"pump-3","client":"pump-3","cert":"abc123","thing":"pump-3"}
INSERT INTO out SELECT clientid() AS client, principal() AS cert, thing_name() AS thing FROM 'x'
