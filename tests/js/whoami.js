// Credentials from the instance-metadata service (IMDSv2 first, as the SDK does on EC2), then
// STS GetCallerIdentity against the endpoint given. Prints the caller's ARN.
const { fromInstanceMetadata } = require("@aws-sdk/credential-providers");
const { STSClient, GetCallerIdentityCommand } = require("@aws-sdk/client-sts");

const endpoint = process.argv[2];
const client = new STSClient({
  region: "us-east-1",
  endpoint,
  credentials: fromInstanceMetadata({ timeout: 2000, maxRetries: 1 }),
});
client
  .send(new GetCallerIdentityCommand({}))
  .then((who) => console.log(who.Arn))
  .catch((error) => {
    console.error(`ERROR ${error.name}: ${error.message}`);
    process.exit(1);
  });
