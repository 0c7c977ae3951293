-- iot-sql-set: SET @name = expression before SELECT; the variables are used in SELECT and
-- WHERE, by later variables, and with the JSON extensions (`@v.property`). The page's first
-- example gives {"celsius": 23.89} for (75 - 32) * 5 / 9, which contradicts the operator
-- tables (iot-sql-operators: Int / Int is an Int): the tables are followed, 23. 9.0 would not
-- help (iot-sql-data-types: SQL V2 processes a whole number such as 10.0 as an Int); / 1.8 is
-- a Decimal division.
-- input: {"topic":"device/data","thing":"d","payload":{"temp_fahrenheit":75,"humidity":60,"device1":{"deviceData":{"sensors":{"temp_fahrenheit":75,"humidity":60}}}},"ts":1}
-- expect out: {"celsius":23,"exact":23.88888888888889,"humidity":60,"hot":true,"sensor_temp":75,"sensor_humidity":60}
INSERT INTO out
SET @temp_celsius = (temp_fahrenheit - 32) * 5 / 9, @exact = (temp_fahrenheit - 32) / 1.8,
    @hot = @exact > 20, @device_sensor_data = device1.deviceData.sensors
SELECT @temp_celsius AS celsius, @exact AS exact, humidity, @hot AS hot,
       @device_sensor_data.temp_fahrenheit AS sensor_temp, @device_sensor_data.humidity as sensor_humidity
FROM 'device/data' WHERE @hot
