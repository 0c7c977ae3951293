"""Creates what docker/sitegate.toml names in the emulator: the Kinesis stream and the KMS key
with its alias. Safe to run again."""
import sys

import boto3

endpoint = sys.argv[1]
kinesis = boto3.client("kinesis", endpoint_url=endpoint)
kms = boto3.client("kms", endpoint_url=endpoint)
try:
    kinesis.create_stream(StreamName="site-telemetry", ShardCount=2)
except kinesis.exceptions.ResourceInUseException:
    pass
aliases = [a["AliasName"] for a in kms.list_aliases()["Aliases"]]
if "alias/sitegate" not in aliases:
    key = kms.create_key(Description="sitegate spool")["KeyMetadata"]["KeyId"]
    kms.create_alias(AliasName="alias/sitegate", TargetKeyId=key)
print("stream site-telemetry and key alias/sitegate ready")
