-- iot-sql-functions, cast(): the page's example cast(true as Int) = 1, and its casting rules.
-- To Int: a Decimal rounded down (12.7 → 12, -1.5 → -2), a String parsed as a Decimal first,
-- true/false → 1/0. To Decimal (and Double): true → 1.0, a String by the pattern of
-- iot-sql-data-types. To Boolean: 0 is false, any other number true, "true"/"false" in any
-- case. To String (String, Nvarchar, Text, Ntext, varchar): the string form, an Array or Object
-- as its JSON. Anything else, and a missing value, is Undefined.
-- The page's "Cast to string" table gives a String the Boolean row's text ("true" = True…);
-- its keyword table says "Casts value to String", which is followed here: a String is itself.
-- input: {"topic":"x","thing":"d","payload":{"b":true,"f":false,"d":12.7,"nd":-1.5,"s":"12.7","t":"TRUE","x":"abc","i":0,"arr":[1,"a"],"o":{"k":1}},"ts":1}
-- expect out: {"page":1,"bi":1,"fi":0,"di":12,"ndi":-2,"si":12,"sd":12.7,"id":0,"bd":1,"sdb":12.7,"ds":"12.7","ist":"0","bs":"true","arrs":"[1,\"a\"]","os":"{\"k\":1}","xs":"abc","ib":false,"db":true,"tb":true}
-- left out: xb, xi, arri, missing
INSERT INTO out SELECT
  cast(true as Int) AS page,
  cast(b AS Int) AS bi,
  CAST(f AS Integer) AS fi,
  cast(d AS Int) AS di,
  cast(nd AS Int) AS ndi,
  cast(s AS Int) AS si,
  cast(s AS Decimal) AS sd,
  cast(i AS Decimal) AS id,
  cast(b AS Decimal) AS bd,
  cast(s AS Double) AS sdb,
  cast(d AS String) AS ds,
  cast(i AS Text) AS ist,
  cast(b AS Nvarchar) AS bs,
  cast(arr AS String) AS arrs,
  cast(o AS String) AS os,
  cast(x AS varchar) AS xs,
  cast(i AS Bool) AS ib,
  cast(d AS Boolean) AS db,
  cast(t AS Boolean) AS tb,
  cast(x AS Boolean) AS xb,
  cast(x AS Int) AS xi,
  cast(arr AS Int) AS arri,
  cast(nothing AS Int) AS missing
FROM 'x'
