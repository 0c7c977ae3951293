-- Alert when a freezer warms up; keep the device's identity on every record.
INSERT INTO alerts
SELECT thing_name() AS thing, principal() AS cert_id, temp, topic(2) AS zone, timestamp() AS ts
FROM 'dt/+/freezer'
WHERE temp > -10
