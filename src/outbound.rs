//! The one policy for requests this service makes to addresses its clients
//! chose (webhooks; model imports would be next), against server-side
//! request forgery.
//!
//! - Only `http` and `https`, and no redirects are followed.
//! - A target is refused when an address it resolves to is loopback,
//!   private (RFC 1918, fc00::/7), link-local, unspecified, multicast,
//!   broadcast, shared (CGNAT, 100.64/10), reserved, for documentation or
//!   benchmarking, or this server's own listening address. Numeric tricks
//!   (`2130706433`, `0x7f.1`, `[::ffff:127.0.0.1]`) are read as the address
//!   they are, and IPv6 forms that embed an IPv4 address (mapped, NAT64,
//!   6to4) are judged by that address.
//! - The host is resolved once, every address is checked, and the
//!   connection is made to the checked addresses only (the client is told
//!   them, so it makes no second lookup that a rebinding DNS server could
//!   answer differently).
//! - Operators allow internal targets explicitly with `--allow-outbound`
//!   (a CIDR block, an address, or a host name), for an in-house receiver.
//!   The server's own address stays refused.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use reqwest::Url;

/// Why an address is not a public one: the rule that refuses it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    Loopback,
    Private,
    LinkLocal,
    Unspecified,
    Multicast,
    Broadcast,
    /// 100.64.0.0/10, carrier-grade NAT.
    SharedAddressSpace,
    Documentation,
    Benchmarking,
    /// 0.0.0.0/8, 192.0.0.0/24, 240.0.0.0/4 and IPv6 blocks with no public
    /// use.
    Reserved,
}

impl Rule {
    /// The rule's name, as messages and the README spell it.
    pub fn name(self) -> &'static str {
        match self {
            Rule::Loopback => "loopback",
            Rule::Private => "private",
            Rule::LinkLocal => "link_local",
            Rule::Unspecified => "unspecified",
            Rule::Multicast => "multicast",
            Rule::Broadcast => "broadcast",
            Rule::SharedAddressSpace => "shared_address_space",
            Rule::Documentation => "documentation",
            Rule::Benchmarking => "benchmarking",
            Rule::Reserved => "reserved",
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Rule::Loopback => "a loopback address",
            Rule::Private => "a private address",
            Rule::LinkLocal => "a link-local address",
            Rule::Unspecified => "the unspecified address",
            Rule::Multicast => "a multicast address",
            Rule::Broadcast => "the broadcast address",
            Rule::SharedAddressSpace => "a shared (carrier-grade NAT) address",
            Rule::Documentation => "an address reserved for documentation",
            Rule::Benchmarking => "an address reserved for benchmarking",
            Rule::Reserved => "a reserved address",
        }
    }
}

/// The rule that refuses `ip`, or `None` for a public address.
pub fn classify(ip: IpAddr) -> Option<Rule> {
    match ip {
        IpAddr::V4(v4) => classify_v4(v4),
        IpAddr::V6(v6) => classify_v6(v6),
    }
}

fn in_v4(ip: Ipv4Addr, net: [u8; 4], prefix: u32) -> bool {
    let mask = u32::MAX.checked_shl(32 - prefix).unwrap_or(0);
    u32::from(ip) & mask == u32::from(Ipv4Addr::from(net)) & mask
}

fn classify_v4(ip: Ipv4Addr) -> Option<Rule> {
    let rules: [([u8; 4], u32, Rule); 17] = [
        ([0, 0, 0, 0], 32, Rule::Unspecified),
        ([0, 0, 0, 0], 8, Rule::Reserved),
        ([10, 0, 0, 0], 8, Rule::Private),
        ([100, 64, 0, 0], 10, Rule::SharedAddressSpace),
        ([127, 0, 0, 0], 8, Rule::Loopback),
        ([169, 254, 0, 0], 16, Rule::LinkLocal),
        ([172, 16, 0, 0], 12, Rule::Private),
        ([192, 0, 0, 0], 24, Rule::Reserved),
        ([192, 0, 2, 0], 24, Rule::Documentation),
        ([192, 88, 99, 0], 24, Rule::Reserved),
        ([192, 168, 0, 0], 16, Rule::Private),
        ([198, 18, 0, 0], 15, Rule::Benchmarking),
        ([198, 51, 100, 0], 24, Rule::Documentation),
        ([203, 0, 113, 0], 24, Rule::Documentation),
        ([224, 0, 0, 0], 4, Rule::Multicast),
        ([255, 255, 255, 255], 32, Rule::Broadcast),
        ([240, 0, 0, 0], 4, Rule::Reserved),
    ];
    rules
        .iter()
        .find(|(net, prefix, _)| in_v4(ip, *net, *prefix))
        .map(|r| r.2)
}

fn in_v6(ip: Ipv6Addr, net: [u16; 8], prefix: u32) -> bool {
    let mask = u128::MAX.checked_shl(128 - prefix).unwrap_or(0);
    u128::from(ip) & mask == u128::from(Ipv6Addr::from(net)) & mask
}

/// The IPv4 address an IPv6 address stands for: mapped (`::ffff:a.b.c.d`),
/// NAT64 (`64:ff9b::a.b.c.d`) or 6to4 (`2002:AABB:CCDD::`).
fn embedded_v4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    if let Some(v4) = ip.to_ipv4_mapped() {
        return Some(v4);
    }
    let bits = u128::from(ip);
    if in_v6(ip, [0x64, 0xff9b, 0, 0, 0, 0, 0, 0], 96) {
        return Some(Ipv4Addr::from(bits as u32));
    }
    if in_v6(ip, [0x2002, 0, 0, 0, 0, 0, 0, 0], 16) {
        return Some(Ipv4Addr::from((bits >> 80) as u32));
    }
    None
}

fn classify_v6(ip: Ipv6Addr) -> Option<Rule> {
    if let Some(v4) = embedded_v4(ip) {
        return classify_v4(v4);
    }
    let rules: [([u16; 8], u32, Rule); 11] = [
        ([0, 0, 0, 0, 0, 0, 0, 0], 128, Rule::Unspecified),
        ([0, 0, 0, 0, 0, 0, 0, 1], 128, Rule::Loopback),
        // IPv4-compatible (deprecated) and the rest of ::/8.
        ([0, 0, 0, 0, 0, 0, 0, 0], 8, Rule::Reserved),
        ([0x0100, 0, 0, 0, 0, 0, 0, 0], 64, Rule::Reserved),
        // Teredo and the other IETF protocol assignments.
        ([0x2001, 0, 0, 0, 0, 0, 0, 0], 23, Rule::Reserved),
        ([0x2001, 0x0db8, 0, 0, 0, 0, 0, 0], 32, Rule::Documentation),
        ([0x3fff, 0, 0, 0, 0, 0, 0, 0], 20, Rule::Documentation),
        ([0xfc00, 0, 0, 0, 0, 0, 0, 0], 7, Rule::Private),
        ([0xfe80, 0, 0, 0, 0, 0, 0, 0], 10, Rule::LinkLocal),
        // Site-local, deprecated but still routed inside some networks.
        ([0xfec0, 0, 0, 0, 0, 0, 0, 0], 10, Rule::Private),
        ([0xff00, 0, 0, 0, 0, 0, 0, 0], 8, Rule::Multicast),
    ];
    rules
        .iter()
        .find(|(net, prefix, _)| in_v6(ip, *net, *prefix))
        .map(|r| r.2)
}

/// An address block: `10.1.0.0/16`, `fd00::/8`, or one address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpNet {
    addr: IpAddr,
    prefix: u32,
}

impl IpNet {
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, unmap(ip)) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => in_v4(ip, net.octets(), self.prefix),
            (IpAddr::V6(net), IpAddr::V6(ip)) => in_v6(ip, net.segments(), self.prefix),
            _ => false,
        }
    }
}

impl fmt::Display for IpNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// An IPv4-mapped IPv6 address as the IPv4 address it is.
fn unmap(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

/// What an operator allows despite the rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Allow {
    Net(IpNet),
    /// A host name, matched without regard to case; every address it
    /// resolves to is allowed.
    Host(String),
}

impl std::str::FromStr for Allow {
    type Err = String;

    /// `CIDR`, a bare address, or a host name.
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if let Some((addr, prefix)) = s.split_once('/') {
            let addr: IpAddr = addr
                .parse()
                .map_err(|_| format!("`{s}` is not a CIDR block: `{addr}` is not an address"))?;
            let max = if addr.is_ipv4() { 32 } else { 128 };
            let prefix: u32 = prefix.parse().ok().filter(|p| *p <= max).ok_or_else(|| {
                format!("`{s}` is not a CIDR block: the prefix must be 0 to {max}")
            })?;
            return Ok(Allow::Net(IpNet {
                addr: unmap(addr),
                prefix,
            }));
        }
        if let Ok(addr) = s
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
        {
            let addr = unmap(addr);
            let prefix = if addr.is_ipv4() { 32 } else { 128 };
            return Ok(Allow::Net(IpNet { addr, prefix }));
        }
        let host = normalize_host(s);
        let valid = !host.is_empty()
            && host.len() <= 253
            && host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'));
        if valid {
            Ok(Allow::Host(host))
        } else {
            Err(format!(
                "`{s}` is neither a CIDR block, an address nor a host name"
            ))
        }
    }
}

fn normalize_host(host: &str) -> String {
    host.trim_end_matches('.').to_ascii_lowercase()
}

/// Why a target was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("`{0}` is not an absolute http or https URL")]
    NotHttp(String),
    #[error("{host} is refused: {ip} is {} (rule `{}`); an operator can allow it with --allow-outbound", .rule.describe(), .rule.name())]
    Address {
        host: String,
        ip: IpAddr,
        rule: Rule,
    },
    #[error("{host} is refused: {addr} is this server's own address (rule `own_address`)")]
    OwnAddress { host: String, addr: SocketAddr },
    #[error("{host} cannot be resolved: {reason}")]
    Unresolved { host: String, reason: String },
}

impl Refusal {
    /// Whether trying again later may succeed (the name did not resolve),
    /// as opposed to a decision of the policy.
    pub fn is_transient(&self) -> bool {
        matches!(self, Refusal::Unresolved { .. })
    }
}

/// A target that passed the policy: the URL and the addresses to connect to.
#[derive(Debug, Clone)]
pub struct Target {
    pub url: Url,
    /// The checked addresses, when the host is a name.
    addrs: Option<(String, Vec<SocketAddr>)>,
}

/// The outbound policy of this server.
#[derive(Debug, Clone, Default)]
pub struct OutboundPolicy {
    allow: Vec<Allow>,
    /// Where this server listens: never a target.
    own: Option<SocketAddr>,
}

impl OutboundPolicy {
    pub fn new(allow: Vec<Allow>, own: Option<SocketAddr>) -> Self {
        Self { allow, own }
    }

    /// The URL, if it is an absolute http(s) URL with a host.
    pub fn parse_url(url: &str) -> Result<Url, Refusal> {
        match Url::parse(url) {
            Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => Ok(u),
            _ => Err(Refusal::NotHttp(url.to_string())),
        }
    }

    fn host_allowed(&self, host: &str) -> bool {
        let host = normalize_host(host);
        self.allow
            .iter()
            .any(|a| matches!(a, Allow::Host(h) if *h == host))
    }

    fn is_own(&self, addr: SocketAddr) -> bool {
        let Some(own) = self.own else {
            return false;
        };
        if addr.port() != own.port() {
            return false;
        }
        let ip = unmap(addr.ip());
        let own_ip = unmap(own.ip());
        ip == own_ip
            || (own_ip.is_unspecified()
                && (ip.is_loopback()
                    || ip.is_unspecified()
                    // Binding succeeds only to an address of this machine.
                    || std::net::UdpSocket::bind((ip, 0)).is_ok()))
    }

    /// Checks one address the host `host` stands for.
    pub fn check_addr(&self, host: &str, addr: SocketAddr) -> Result<(), Refusal> {
        if self.is_own(addr) {
            return Err(Refusal::OwnAddress {
                host: host.to_string(),
                addr,
            });
        }
        let ip = unmap(addr.ip());
        let Some(rule) = classify(ip) else {
            return Ok(());
        };
        let allowed = self.host_allowed(host)
            || self
                .allow
                .iter()
                .any(|a| matches!(a, Allow::Net(n) if n.contains(ip)));
        if allowed {
            Ok(())
        } else {
            Err(Refusal::Address {
                host: host.to_string(),
                ip,
                rule,
            })
        }
    }

    /// Checks what can be decided without the network: the scheme, and
    /// the address when the host is one. `Ok(None)` for a host name, which
    /// only resolution can decide.
    pub fn check_literal(&self, url: &str) -> Result<Option<Target>, Refusal> {
        let url = Self::parse_url(url)?;
        let port = url.port_or_known_default().unwrap_or(80);
        let host = url.host_str().unwrap_or_default().to_string();
        // The URL parser has already read numeric hosts (`2130706433`,
        // `0x7f.1`) as the address they are and written it in its usual form.
        let Ok(ip) = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
        else {
            return Ok(None);
        };
        self.check_addr(&host, SocketAddr::new(ip, port))?;
        Ok(Some(Target { url, addrs: None }))
    }

    /// Resolves the URL's host once and checks every address it has; all
    /// must pass (a name with one refused address is refused, whatever the
    /// others).
    pub async fn resolve(&self, url: &str, timeout: Duration) -> Result<Target, Refusal> {
        if let Some(target) = self.check_literal(url)? {
            return Ok(target);
        }
        let url = Self::parse_url(url)?;
        let host = url.host_str().unwrap_or_default().to_string();
        let port = url.port_or_known_default().unwrap_or(80);
        let unresolved = |reason: String| Refusal::Unresolved {
            host: host.clone(),
            reason,
        };
        let addrs: Vec<SocketAddr> =
            match tokio::time::timeout(timeout, tokio::net::lookup_host((host.as_str(), port)))
                .await
            {
                Ok(Ok(addrs)) => addrs.collect(),
                Ok(Err(e)) => return Err(unresolved(e.to_string())),
                Err(_) => return Err(unresolved("the lookup timed out".into())),
            };
        if addrs.is_empty() {
            return Err(unresolved("no address".into()));
        }
        for addr in &addrs {
            self.check_addr(&host, *addr)?;
        }
        Ok(Target {
            url,
            addrs: Some((host, addrs)),
        })
    }

    /// An HTTP client for one checked target: it connects only to the
    /// checked addresses, follows no redirect and uses no proxy.
    pub fn client(&self, target: &Target, timeout: Duration) -> reqwest::Result<reqwest::Client> {
        let mut builder = reqwest::Client::builder()
            .user_agent(concat!("modelpress/", env!("CARGO_PKG_VERSION")))
            .timeout(timeout)
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy();
        if let Some((host, addrs)) = &target.addrs {
            builder = builder.resolve_to_addrs(host, addrs);
        }
        builder.build()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused_rule(policy: &OutboundPolicy, url: &str) -> Option<&'static str> {
        match policy.check_literal(url) {
            Err(Refusal::Address { rule, .. }) => Some(rule.name()),
            Err(Refusal::OwnAddress { .. }) => Some("own_address"),
            Err(e) => panic!("{url}: {e}"),
            Ok(_) => None,
        }
    }

    #[test]
    fn addresses_are_classified_by_their_special_ranges() {
        let cases = [
            ("127.0.0.1", Some(Rule::Loopback)),
            ("127.255.0.9", Some(Rule::Loopback)),
            ("0.0.0.0", Some(Rule::Unspecified)),
            ("0.1.2.3", Some(Rule::Reserved)),
            ("10.0.0.1", Some(Rule::Private)),
            ("172.16.0.1", Some(Rule::Private)),
            ("172.31.255.255", Some(Rule::Private)),
            ("172.32.0.1", None),
            ("192.168.1.1", Some(Rule::Private)),
            ("169.254.169.254", Some(Rule::LinkLocal)),
            ("100.64.0.1", Some(Rule::SharedAddressSpace)),
            ("100.128.0.1", None),
            ("192.0.2.1", Some(Rule::Documentation)),
            ("198.18.0.1", Some(Rule::Benchmarking)),
            ("224.0.0.1", Some(Rule::Multicast)),
            ("240.0.0.1", Some(Rule::Reserved)),
            ("255.255.255.255", Some(Rule::Broadcast)),
            ("8.8.8.8", None),
            ("93.184.216.34", None),
            ("::", Some(Rule::Unspecified)),
            ("::1", Some(Rule::Loopback)),
            ("::ffff:127.0.0.1", Some(Rule::Loopback)),
            ("::ffff:10.1.2.3", Some(Rule::Private)),
            ("::ffff:8.8.8.8", None),
            ("64:ff9b::a9fe:a9fe", Some(Rule::LinkLocal)),
            ("2002:7f00:1::", Some(Rule::Loopback)),
            ("fc00::1", Some(Rule::Private)),
            ("fd12:3456::1", Some(Rule::Private)),
            ("fe80::1", Some(Rule::LinkLocal)),
            ("ff02::1", Some(Rule::Multicast)),
            ("2001:db8::1", Some(Rule::Documentation)),
            ("2606:4700:4700::1111", None),
        ];
        for (ip, rule) in cases {
            assert_eq!(classify(ip.parse().unwrap()), rule, "{ip}");
        }
    }

    #[test]
    fn numeric_host_tricks_are_read_as_the_address_they_are() {
        let policy = OutboundPolicy::default();
        for (url, rule) in [
            ("http://2130706433/", "loopback"),
            ("http://0x7f.1/", "loopback"),
            ("http://0177.0.0.1/", "loopback"),
            ("http://127.1/", "loopback"),
            ("http://[::ffff:127.0.0.1]/", "loopback"),
            ("http://[::ffff:7f00:1]:8080/x", "loopback"),
            ("http://0/", "unspecified"),
            ("https://169.254.169.254/latest/meta-data", "link_local"),
            ("http://[fe80::1]/", "link_local"),
            ("http://10.0.0.1./", "private"),
        ] {
            assert_eq!(refused_rule(&policy, url), Some(rule), "{url}");
        }
        assert_eq!(refused_rule(&policy, "http://8.8.8.8/"), None);
        assert!(policy
            .check_literal("http://example.com/")
            .unwrap()
            .is_none());
    }

    #[test]
    fn only_absolute_http_urls_are_accepted() {
        let policy = OutboundPolicy::default();
        for url in [
            "ftp://example.com/",
            "file:///etc/passwd",
            "example.com",
            "http://",
            "gopher://1.1.1.1/",
        ] {
            assert!(
                matches!(policy.check_literal(url), Err(Refusal::NotHttp(_))),
                "{url}"
            );
        }
    }

    #[test]
    fn allowed_blocks_and_hosts_lift_the_rules_but_not_the_own_address() {
        let allow: Vec<Allow> = [
            "127.0.0.1/32",
            "10.0.0.0/8",
            "fd00::/8",
            "Registry.Internal.",
        ]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
        let own: SocketAddr = "127.0.0.1:8080".parse().unwrap();
        let policy = OutboundPolicy::new(allow, Some(own));
        assert_eq!(refused_rule(&policy, "http://127.0.0.1:9000/"), None);
        assert_eq!(
            refused_rule(&policy, "http://[::ffff:127.0.0.1]:9000/"),
            None
        );
        assert_eq!(refused_rule(&policy, "http://10.200.0.1/"), None);
        assert_eq!(refused_rule(&policy, "http://[fd00::5]/"), None);
        assert_eq!(refused_rule(&policy, "http://127.0.0.2/"), Some("loopback"));
        assert_eq!(
            refused_rule(&policy, "http://192.168.0.1/"),
            Some("private")
        );
        assert_eq!(
            refused_rule(&policy, "http://127.0.0.1:8080/v1/jobs"),
            Some("own_address")
        );
        let ip: IpAddr = "192.168.3.4".parse().unwrap();
        assert!(policy
            .check_addr("registry.internal", SocketAddr::new(ip, 443))
            .is_ok());
        assert!(policy
            .check_addr("other.internal", SocketAddr::new(ip, 443))
            .is_err());
    }

    #[test]
    fn a_server_listening_everywhere_refuses_its_port_on_local_addresses() {
        let policy = OutboundPolicy::new(
            vec!["127.0.0.0/8".parse().unwrap()],
            Some("0.0.0.0:8080".parse().unwrap()),
        );
        assert_eq!(
            refused_rule(&policy, "http://127.0.0.1:8080/"),
            Some("own_address")
        );
        assert_eq!(refused_rule(&policy, "http://127.0.0.1:8081/"), None);
    }

    #[test]
    fn allow_rules_are_parsed_strictly() {
        assert_eq!(
            "10.0.0.0/8".parse::<Allow>().unwrap().to_string_for_test(),
            "10.0.0.0/8"
        );
        assert_eq!(
            "::1".parse::<Allow>().unwrap().to_string_for_test(),
            "::1/128"
        );
        assert_eq!(
            "[::ffff:10.0.0.1]"
                .parse::<Allow>()
                .unwrap()
                .to_string_for_test(),
            "10.0.0.1/32"
        );
        for bad in ["10.0.0.0/33", "10.0.0/8", "fd00::/129", "a b", "", "x/y"] {
            assert!(bad.parse::<Allow>().is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn a_name_is_refused_by_the_addresses_it_resolves_to() {
        let policy = OutboundPolicy::default();
        let e = policy
            .resolve("http://localhost:9/", Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(
            matches!(
                e,
                Refusal::Address {
                    rule: Rule::Loopback,
                    ..
                }
            ),
            "{e}"
        );
        let allowed = OutboundPolicy::new(vec!["localhost".parse().unwrap()], None);
        let target = allowed
            .resolve("http://LOCALHOST:9/", Duration::from_secs(5))
            .await
            .unwrap();
        assert!(target.addrs.is_some());
    }

    impl Allow {
        fn to_string_for_test(&self) -> String {
            match self {
                Allow::Net(n) => n.to_string(),
                Allow::Host(h) => h.clone(),
            }
        }
    }
}
