-- iot-sql-functions, accountid(): "Returns the ID of the account that owns this rule as a
-- String"; the page's example accountid() = "123456789012". At the edge the account is
-- `[rules] account_id` (refused_accountid_unknown.sql without it).
-- account_id: 123456789012
-- input: {"topic":"x","thing":"d","payload":{},"ts":1}
-- expect out: {"a":"123456789012","same":true}
INSERT INTO out SELECT accountid() AS a, accountid() = "123456789012" AS same FROM 'x'
