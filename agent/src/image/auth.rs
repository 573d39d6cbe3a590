//! Registry credentials from image pull secrets: the JSON of a `kubernetes.io/dockerconfigjson`
//! Secret (`{"auths": {"host:port": {...}}}`) or of the older `kubernetes.io/dockercfg` (the
//! same map without `auths`). An entry gives a user name and password (or `auth`, their
//! base64 `user:password`), or an identity token used as a bearer token.

use base64::Engine as _;
use oci_client::secrets::RegistryAuth;
use serde::Deserialize;

#[derive(Deserialize, Default)]
struct Entry {
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
    #[serde(default)]
    auth: Option<String>,
    #[serde(default, alias = "identityToken")]
    identitytoken: Option<String>,
    #[serde(default, alias = "registryToken")]
    registrytoken: Option<String>,
}

/// The host (and port) a config key names: `https://host:port/v1/` → `host:port`; Docker
/// Hub's aliases become `docker.io`.
fn registry_host(key: &str) -> String {
    let key = key
        .trim()
        .trim_start_matches("https://")
        .trim_start_matches("http://");
    let host = key
        .split('/')
        .next()
        .unwrap_or_default()
        .to_ascii_lowercase();
    match host.as_str() {
        "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com" => {
            "docker.io".to_owned()
        }
        _ => host,
    }
}

fn entry_auth(e: Entry) -> Option<RegistryAuth> {
    if let Some(token) = e.registrytoken.filter(|t| !t.is_empty()) {
        return Some(RegistryAuth::Bearer(token));
    }
    if let (Some(user), Some(pass)) = (&e.username, &e.password)
        && !user.is_empty()
    {
        return Some(RegistryAuth::Basic(user.clone(), pass.clone()));
    }
    if let Some(auth) = e.auth.filter(|a| !a.is_empty()) {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(auth.trim())
            .ok()?;
        let text = String::from_utf8(decoded).ok()?;
        let (user, pass) = text.split_once(':')?;
        return Some(RegistryAuth::Basic(user.to_owned(), pass.to_owned()));
    }
    e.identitytoken
        .filter(|t| !t.is_empty())
        .map(RegistryAuth::Bearer)
}

/// The credentials `config` (a docker config JSON document) holds for `registry` (as in an
/// image reference: `host[:port]`, `docker.io` for Docker Hub), if any.
pub fn credentials_for(config: &[u8], registry: &str) -> Option<RegistryAuth> {
    let doc: serde_json::Value = serde_json::from_slice(config).ok()?;
    let map = doc.get("auths").unwrap_or(&doc).as_object()?;
    let wanted = registry_host(registry);
    map.iter()
        .find(|(key, _)| registry_host(key) == wanted)
        .and_then(|(_, v)| serde_json::from_value::<Entry>(v.clone()).ok())
        .and_then(entry_auth)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn basic(a: Option<RegistryAuth>) -> Option<(String, String)> {
        match a? {
            RegistryAuth::Basic(u, p) => Some((u, p)),
            _ => None,
        }
    }

    #[test]
    fn entries_match_by_host() {
        let cfg = br#"{"auths": {
            "https://index.docker.io/v1/": {"auth": "aHViOnNlY3JldA=="},
            "localhost:5000": {"username": "u", "password": "p"},
            "tok.example": {"identitytoken": "t0k"}}}"#;
        assert_eq!(
            basic(credentials_for(cfg, "docker.io")),
            Some(("hub".into(), "secret".into()))
        );
        assert_eq!(
            basic(credentials_for(cfg, "localhost:5000")),
            Some(("u".into(), "p".into()))
        );
        assert!(matches!(
            credentials_for(cfg, "tok.example"),
            Some(RegistryAuth::Bearer(t)) if t == "t0k"
        ));
        assert!(credentials_for(cfg, "localhost:5001").is_none());
    }

    #[test]
    fn legacy_dockercfg_is_read() {
        let cfg = br#"{"reg.example:443": {"auth": "YTpi"}}"#;
        assert_eq!(
            basic(credentials_for(cfg, "reg.example:443")),
            Some(("a".into(), "b".into()))
        );
        assert!(credentials_for(b"not json", "x").is_none());
    }
}
