//! resolv.conf: parsing the node's, and rendering a pod's.

use std::net::IpAddr;

/// Most nameservers the C library reads (glibc's MAXNS); kubelet keeps the same limit.
pub const MAX_NAMESERVERS: usize = 3;
/// Most search domains kubelet writes.
pub const MAX_SEARCHES: usize = 32;

/// The parts of a resolv.conf that matter to pods.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResolvConf {
    /// `nameserver` addresses, in order.
    pub nameservers: Vec<String>,
    /// `search` domains, in order (`domain` counts as a one-entry search list).
    pub searches: Vec<String>,
    /// `options`, each `name` or `name:value`.
    pub options: Vec<String>,
}

impl ResolvConf {
    /// Parses resolv.conf text; unknown lines and comments are ignored, and the last
    /// `search`/`domain` line wins, as in glibc.
    pub fn parse(text: &str) -> Self {
        let mut conf = ResolvConf::default();
        for line in text.lines() {
            let line = line.split(['#', ';']).next().unwrap_or_default();
            let mut words = line.split_whitespace();
            match words.next() {
                Some("nameserver") => conf.nameservers.extend(words.next().map(str::to_owned)),
                Some("search" | "domain") => conf.searches = words.map(str::to_owned).collect(),
                Some("options") => {
                    for o in words {
                        merge_option(&mut conf.options, o);
                    }
                }
                _ => {}
            }
        }
        conf
    }

    /// The nameservers that are IP addresses.
    pub fn nameserver_ips(&self) -> Vec<IpAddr> {
        self.nameservers
            .iter()
            .filter_map(|n| n.parse().ok())
            .collect()
    }

    /// Adds nameservers and search domains that are not there yet, and options (replacing
    /// an option of the same name), then applies the limits.
    pub fn merge(&mut self, nameservers: &[String], searches: &[String], options: &[String]) {
        for n in nameservers {
            if !self.nameservers.contains(n) {
                self.nameservers.push(n.clone());
            }
        }
        for s in searches {
            if !self.searches.contains(s) {
                self.searches.push(s.clone());
            }
        }
        for o in options {
            merge_option(&mut self.options, o);
        }
        self.nameservers.truncate(MAX_NAMESERVERS);
        self.searches.truncate(MAX_SEARCHES);
    }

    /// The file's text.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for n in &self.nameservers {
            out.push_str(&format!("nameserver {n}\n"));
        }
        if !self.searches.is_empty() {
            out.push_str(&format!("search {}\n", self.searches.join(" ")));
        }
        if !self.options.is_empty() {
            out.push_str(&format!("options {}\n", self.options.join(" ")));
        }
        out
    }
}

/// Sets `option` (`name` or `name:value`) in `options`, replacing one of the same name.
fn merge_option(options: &mut Vec<String>, option: &str) {
    let name = |o: &str| o.split(':').next().unwrap_or_default().to_owned();
    let new = name(option);
    match options.iter_mut().find(|o| name(o) == new) {
        Some(existing) => *existing = option.to_owned(),
        None => options.push(option.to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_renders() {
        let conf = ResolvConf::parse(
            "# generated\nnameserver 10.0.0.2\nnameserver fe80::1%eth0\ndomain a.example\n\
             search b.example c.example ; comment\noptions ndots:2 timeout:1\noptions ndots:3\n",
        );
        assert_eq!(conf.nameservers, ["10.0.0.2", "fe80::1%eth0"]);
        assert_eq!(
            conf.nameserver_ips(),
            ["10.0.0.2".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(conf.searches, ["b.example", "c.example"]);
        assert_eq!(conf.options, ["ndots:3", "timeout:1"]);
        assert_eq!(
            conf.render(),
            "nameserver 10.0.0.2\nnameserver fe80::1%eth0\nsearch b.example c.example\n\
             options ndots:3 timeout:1\n"
        );
    }

    #[test]
    fn merge_dedups_overrides_and_limits() {
        let mut conf = ResolvConf::parse("nameserver 1.1.1.1\nsearch a\noptions ndots:5\n");
        conf.merge(
            &[
                "1.1.1.1".into(),
                "2.2.2.2".into(),
                "3.3.3.3".into(),
                "4.4.4.4".into(),
            ],
            &["a".into(), "b".into()],
            &["ndots:2".into(), "edns0".into()],
        );
        assert_eq!(conf.nameservers, ["1.1.1.1", "2.2.2.2", "3.3.3.3"]);
        assert_eq!(conf.searches, ["a", "b"]);
        assert_eq!(conf.options, ["ndots:2", "edns0"]);
    }
}
