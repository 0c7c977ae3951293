-- iot-sql-functions, accountid(): without `[rules] account_id` the gateway does not know the
-- account, so the rule is refused at load, naming the key to set.
-- expect-error: accountid(): the account that owns the rules is not known at the edge; set [rules] account_id
INSERT INTO out SELECT accountid() AS a FROM 'x'
