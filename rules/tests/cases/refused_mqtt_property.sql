-- iot-sql-functions, get_mqtt_property(): the name is one of content_type, format_indicator,
-- response_topic, correlation_data; another is refused at load.
-- expect-error: the property is one of content_type, format_indicator, response_topic, correlation_data
INSERT INTO out SELECT get_mqtt_property('topic_alias') AS a FROM 'x'
