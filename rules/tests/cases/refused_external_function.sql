-- iot-sql-functions, aws_lambda(functionArn, inputJson): calls another AWS service, which the
-- gateway does not do; refused at load with the service named.
-- expect-error: aws_lambda() calls AWS Lambda
INSERT INTO out SELECT aws_lambda("arn:aws:lambda:us-east-1:123456789012:function:f", *) AS r FROM 'x'
