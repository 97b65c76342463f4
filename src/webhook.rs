//! Webhook deliveries: a JSON body POSTed to the URL a job named, signed
//! with HMAC-SHA256 so the receiver can check it came from this service.
//!
//! `X-Modelpress-Signature: sha256=<hex of HMAC-SHA256(secret, body)>`.
//! Each delivery runs on its own task and is retried with exponential
//! backoff, so a slow or dead receiver never holds up a worker.
//!
//! Every attempt goes through the [outbound policy](crate::outbound): the
//! target is resolved and checked again (it was checked when the job was
//! created, but a name may resolve elsewhere now), the connection goes to
//! the checked addresses, and a redirect counts as a refusal.

use std::sync::Arc;
use std::time::Duration;

use crate::outbound::{OutboundPolicy, Target};

use hmac::{Hmac, Mac};
use sha2::Sha256;

pub const SIGNATURE_HEADER: &str = "x-modelpress-signature";
pub const EVENT_HEADER: &str = "x-modelpress-event";
pub const DELIVERY_HEADER: &str = "x-modelpress-delivery";

#[derive(Debug, Clone)]
pub struct RetryPolicy {
    pub attempts: u32,
    pub first_delay: Duration,
    pub timeout: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            attempts: 6,
            first_delay: Duration::from_secs(1),
            timeout: Duration::from_secs(10),
        }
    }
}

#[derive(Clone)]
pub struct Webhooks {
    policy: Arc<OutboundPolicy>,
    secret: Option<Vec<u8>>,
    retry: RetryPolicy,
}

/// `sha256=<hex>` of the body under the secret.
pub fn signature(secret: &[u8], body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC accepts keys of any length");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

impl Webhooks {
    pub fn new(secret: Option<String>, retry: RetryPolicy, policy: Arc<OutboundPolicy>) -> Self {
        Self {
            policy,
            secret: secret.filter(|s| !s.is_empty()).map(String::into_bytes),
            retry,
        }
    }

    /// Sends `body` to `url` in the background, retrying until it is
    /// accepted (any 2xx) or the attempts run out.
    pub fn deliver(&self, url: String, event: &'static str, body: Vec<u8>) {
        let this = self.clone();
        tokio::spawn(async move { this.deliver_now(&url, event, body).await });
    }

    /// Delivers and returns whether the receiver accepted it.
    pub async fn deliver_now(&self, url: &str, event: &str, body: Vec<u8>) -> bool {
        let delivery = uuid::Uuid::new_v4().to_string();
        let signature = self.secret.as_deref().map(|s| signature(s, &body));
        let mut delay = self.retry.first_delay;
        for attempt in 1..=self.retry.attempts.max(1) {
            let target = match self.policy.resolve(url, self.retry.timeout).await {
                Ok(target) => Some(target),
                Err(e) if e.is_transient() => {
                    tracing::warn!(url, event, attempt, error = %e, "webhook not delivered");
                    None
                }
                Err(e) => {
                    tracing::error!(url, event, error = %e, "webhook refused by the outbound policy");
                    return false;
                }
            };
            if let Some(target) = target {
                if self
                    .attempt(&target, event, &delivery, &body, signature.as_deref())
                    .await
                {
                    tracing::info!(url, event, attempt, "webhook delivered");
                    return true;
                }
            }
            if attempt < self.retry.attempts {
                tokio::time::sleep(delay).await;
                delay = delay.saturating_mul(2);
            }
        }
        tracing::error!(url, event, "webhook given up after every attempt");
        false
    }

    /// One delivery attempt; whether the receiver accepted it.
    async fn attempt(
        &self,
        target: &Target,
        event: &str,
        delivery: &str,
        body: &[u8],
        signature: Option<&str>,
    ) -> bool {
        let url = target.url.as_str();
        let client = match self.policy.client(target, self.retry.timeout) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(url, error = %e, "could not build the webhook client");
                return false;
            }
        };
        let mut req = client
            .post(target.url.clone())
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(EVENT_HEADER, event)
            .header(DELIVERY_HEADER, delivery)
            .body(body.to_vec());
        if let Some(sig) = signature {
            req = req.header(SIGNATURE_HEADER, sig);
        }
        match req.send().await {
            Ok(resp) if resp.status().is_success() => true,
            Ok(resp) => {
                // Redirects included: they are not followed.
                tracing::warn!(
                    url,
                    event,
                    status = resp.status().as_u16(),
                    "webhook refused"
                );
                false
            }
            Err(e) => {
                tracing::warn!(url, event, error = %e, "webhook not delivered");
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signature_is_the_rfc_4231_hmac_sha256() {
        // RFC 4231, test case 2.
        assert_eq!(
            signature(b"Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
