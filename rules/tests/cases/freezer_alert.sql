-- The design brief's example: alert when a freezer warms up, keeping the device's identity.
-- input: {"topic":"dt/freezer-1/freezer","thing":"freezer-1","payload":{"temp":-18},"ts":1000}
-- input: {"topic":"dt/freezer-2/freezer","thing":"freezer-2","payload":{"temp":-4},"ts":2000}
-- input: {"topic":"dt/freezer-2/door","thing":"freezer-2","payload":{"temp":30},"ts":3000}
-- expect alerts: {"@thing":"freezer-2","thing":"freezer-2","cert_id":"cert-freezer-2","temp":-4,"zone":"freezer-2","ts":2000}
INSERT INTO alerts
SELECT thing_name() AS thing, principal() AS cert_id, temp, topic(2) AS zone, timestamp() AS ts
FROM 'dt/+/freezer'
WHERE temp > -10
