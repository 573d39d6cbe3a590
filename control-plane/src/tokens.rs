//! Bootstrap tokens through the API, for `keelson token create|list|delete`: each token is a
//! `bootstrap.kubernetes.io/token` Secret in `kube-system` (see
//! [`keelson_api_types::bootstrap_token`]).

use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use keelson_api_types::bootstrap_token::{
    self as bt, BootstrapToken, NAMESPACE, SECRET_TYPE, TokenInfo, TokenOptions,
};
use kube::api::{Api, DeleteParams, ListParams, PostParams};

/// Errors of token operations.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// An API call failed.
    #[error("{action}: {source}")]
    Api {
        /// What was being done.
        action: String,
        /// The client's error.
        source: kube::Error,
    },
    /// A token could not be made or read.
    #[error(transparent)]
    Token(#[from] bt::TokenError),
    /// No token has this id.
    #[error("bootstrap token {0:?} not found")]
    NotFound(String),
}

/// Local result alias.
pub type Result<T, E = TokenError> = std::result::Result<T, E>;

fn secrets(client: &kube::Client) -> Api<Secret> {
    Api::namespaced(client.clone(), NAMESPACE)
}

/// The expiration of a token valid for `ttl` from `now`; a zero `ttl` never expires.
pub fn expiration(now: jiff::Timestamp, ttl: Duration) -> Option<jiff::Timestamp> {
    if ttl.is_zero() {
        return None;
    }
    let span = jiff::SignedDuration::try_from(ttl).ok()?;
    now.checked_add(span).ok()
}

/// Creates a new random token (a fresh id if one is taken).
///
/// # Errors
/// The API refuses the Secret, or randomness fails.
pub async fn create(client: &kube::Client, opts: &TokenOptions) -> Result<BootstrapToken> {
    let api = secrets(client);
    let mut attempt = 0;
    loop {
        let token = BootstrapToken::generate()?;
        match api
            .create(&PostParams::default(), &token.to_secret(opts))
            .await
        {
            Ok(_) => return Ok(token),
            Err(kube::Error::Api(e)) if e.code == 409 && attempt < 3 => attempt += 1,
            Err(source) => {
                return Err(TokenError::Api {
                    action: format!("creating Secret {NAMESPACE}/{}", token.secret_name()),
                    source,
                });
            }
        }
    }
}

/// Every bootstrap token, by id.
///
/// # Errors
/// The list fails.
pub async fn list(client: &kube::Client) -> Result<Vec<TokenInfo>> {
    let list = secrets(client)
        .list(&ListParams::default().fields(&format!("type={SECRET_TYPE}")))
        .await
        .map_err(|source| TokenError::Api {
            action: format!("listing Secrets in {NAMESPACE}"),
            source,
        })?;
    let mut out: Vec<TokenInfo> = list
        .items
        .iter()
        .filter_map(TokenInfo::from_secret)
        .collect();
    out.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(out)
}

/// Deletes the token with this id (or the token `<id>.<secret>` itself).
///
/// # Errors
/// No such token, or the API fails.
pub async fn delete(client: &kube::Client, id_or_token: &str) -> Result<()> {
    let id = id_or_token
        .split_once('.')
        .map_or(id_or_token, |(id, _)| id)
        .trim();
    if !bt::valid_id(id) {
        return Err(bt::TokenError::Malformed(id_or_token.to_owned()).into());
    }
    let name = format!("{}{id}", bt::SECRET_PREFIX);
    match secrets(client)
        .delete(&name, &DeleteParams::default())
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Err(TokenError::NotFound(id.to_owned())),
        Err(source) => Err(TokenError::Api {
            action: format!("deleting Secret {NAMESPACE}/{name}"),
            source,
        }),
    }
}

/// The `keelson token list` table.
pub fn table(tokens: &[TokenInfo], now: jiff::Timestamp) -> String {
    let mut rows = vec![[
        "TOKEN ID".to_owned(),
        "TTL".to_owned(),
        "EXPIRES".to_owned(),
        "USAGES".to_owned(),
        "DESCRIPTION".to_owned(),
    ]];
    for t in tokens {
        let (ttl, expires) = match t.expiration {
            None => ("<forever>".to_owned(), "<never>".to_owned()),
            Some(e) if e <= now => ("<expired>".to_owned(), e.to_string()),
            Some(e) => {
                let secs = e.as_second() - now.as_second();
                (human(secs), e.to_string())
            }
        };
        rows.push([
            t.id.clone(),
            ttl,
            expires,
            t.usages.join(","),
            t.description.clone().unwrap_or_else(|| "<none>".into()),
        ]);
    }
    let widths: Vec<usize> = (0..5)
        .map(|i| rows.iter().map(|r| r[i].len()).max().unwrap_or(0))
        .collect();
    rows.iter()
        .map(|r| {
            let line: Vec<String> = r
                .iter()
                .zip(&widths)
                .map(|(c, w)| format!("{c:<w$}"))
                .collect();
            format!("{}\n", line.join("   ").trim_end())
        })
        .collect()
}

fn human(secs: i64) -> String {
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 2 * 3600 => format!("{}m", s / 60),
        s if s < 2 * 86400 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttl_zero_never_expires() {
        let now: jiff::Timestamp = "2030-01-01T00:00:00Z".parse().expect("time");
        assert_eq!(expiration(now, Duration::ZERO), None);
        assert_eq!(
            expiration(now, Duration::from_secs(3600)).map(|t| t.to_string()),
            Some("2030-01-01T01:00:00Z".to_owned())
        );
    }

    #[test]
    fn table_shows_ttl_and_expired_tokens() {
        let now: jiff::Timestamp = "2030-01-01T00:00:00Z".parse().expect("time");
        let t = |id: &str, exp: Option<&str>| TokenInfo {
            id: id.into(),
            expiration: exp.map(|e| e.parse().expect("time")),
            usages: vec!["authentication".into(), "signing".into()],
            description: None,
            extra_groups: vec![],
        };
        let out = table(
            &[
                t("aaaaaa", Some("2030-01-01T01:00:00Z")),
                t("bbbbbb", Some("2029-01-01T00:00:00Z")),
                t("cccccc", None),
            ],
            now,
        );
        let lines: Vec<&str> = out.lines().collect();
        assert!(lines[0].starts_with("TOKEN ID"), "{out}");
        assert!(
            lines[1].contains("aaaaaa") && lines[1].contains("60m"),
            "{out}"
        );
        assert!(lines[2].contains("<expired>"), "{out}");
        assert!(lines[3].contains("<forever>"), "{out}");
    }
}
