-- iot-sql-functions, get_mqtt_property(name) and get_user_properties(key): the MQTT 5
-- properties the message was published with (MQTT 5 §3.3.2.3). content_type and
-- response_topic as sent, format_indicator as "UTF8_DATA" or "UNSPECIFIED_BYTES",
-- correlation_data base64-encoded; get_user_properties gives every value of the key, in order,
-- as an Array. A property not sent is Undefined; a name that is not a property is refused at
-- load (refused_mqtt_property.sql).
-- input: {"topic":"x","thing":"d","payload":{"v":1},"ts":1,"properties":{"payload_format_indicator":1,"content_type":"application/json","response_topic":"reply/d","correlation_data":"req-1","user_properties":[["site","north"],["tag","a"],["tag","b"]]}}
-- input: {"topic":"x","thing":"d","payload":{"v":2},"ts":2}
-- expect out: {"v":1,"ct":"application/json","fmt":"UTF8_DATA","rt":"reply/d","cd":"cmVxLTE=","site":["north"],"tags":["a","b"],"@left_out":["none"]}
-- expect out: {"v":2,"@left_out":["ct","fmt","rt","cd","site","tags","none"]}
INSERT INTO out SELECT v, get_mqtt_property('content_type') AS ct,
       get_mqtt_property("format_indicator") AS fmt, get_mqtt_property('response_topic') AS rt,
       get_mqtt_property('correlation_data') AS cd, get_user_properties('site') AS site,
       get_user_properties('tag') AS tags, get_user_properties('missing') AS none
FROM 'x'
