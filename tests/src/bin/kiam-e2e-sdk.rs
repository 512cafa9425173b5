//! The Rust AWS SDK as a pod would use it on EC2: credentials from the instance-metadata
//! service (aws-config's IMDS provider, IMDSv2), then STS GetCallerIdentity against the
//! endpoint given. Prints the caller's ARN. The metadata endpoint follows the SDK's own
//! settings (`AWS_EC2_METADATA_SERVICE_ENDPOINT[_MODE]`), so it goes to 169.254.169.254
//! (or `[fd00:ec2::254]`) and through kiam's redirect.

use anyhow::Context as _;
use aws_config::{BehaviorVersion, Region, imds::credentials::ImdsCredentialsProvider};

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let endpoint = std::env::args()
        .nth(1)
        .context("usage: kiam-e2e-sdk STS_ENDPOINT_URL")?;
    let config = aws_config::defaults(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .credentials_provider(ImdsCredentialsProvider::builder().build())
        .endpoint_url(endpoint)
        .load()
        .await;
    let who = aws_sdk_sts::Client::new(&config)
        .get_caller_identity()
        .send()
        .await
        .map_err(|e| anyhow::anyhow!("{}", aws_sdk_sts::error::DisplayErrorContext(&e)))?;
    println!("{}", who.arn().unwrap_or_default());
    Ok(())
}
