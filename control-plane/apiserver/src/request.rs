//! What a resource request addresses: parsed from the URL path and query.

use std::collections::HashMap;

use crate::{
    resources::{self, Resource},
    status::{ApiError, ApiResult},
};

/// The object or collection a request is for.
#[derive(Debug)]
pub struct Target {
    /// The resource.
    pub resource: &'static Resource,
    /// The namespace from the path, if any.
    pub namespace: Option<String>,
    /// The object name, for object requests.
    pub name: Option<String>,
    /// The subresource (`status`, `scale`, …), if any.
    pub sub: Option<String>,
}

impl Target {
    /// Parses the path below `/api/v1` or `/apis/<group>/<version>`.
    ///
    /// # Errors
    /// 404 when no served resource matches.
    pub fn parse(group: &str, version: &str, rest: &str, full_path: &str) -> ApiResult<Self> {
        let segs: Vec<&str> = rest.split('/').filter(|s| !s.is_empty()).collect();
        let find = |plural: &str| {
            resources::find(group, version, plural).ok_or_else(|| ApiError::no_route(full_path))
        };
        let target = |resource: &'static Resource,
                      ns: Option<&str>,
                      name: Option<&str>,
                      sub: Option<&str>| Target {
            resource,
            namespace: ns.map(str::to_owned),
            name: name.map(str::to_owned),
            sub: sub.map(str::to_owned),
        };
        let t = match segs.as_slice() {
            [plural] => target(find(plural)?, None, None, None),
            // `namespaces/<ns>/<plural>…` when <plural> is a namespaced resource; otherwise
            // a subresource of the namespace itself (`namespaces/<ns>/status`).
            ["namespaces", ns, plural, rest @ ..]
                if resources::find(group, version, plural).is_some_and(|r| r.namespaced) =>
            {
                let r = find(plural)?;
                match rest {
                    [] => target(r, Some(ns), None, None),
                    [name] => target(r, Some(ns), Some(name), None),
                    [name, sub] => target(r, Some(ns), Some(name), Some(sub)),
                    _ => return Err(ApiError::no_route(full_path)),
                }
            }
            [plural, name] => target(find(plural)?, None, Some(name), None),
            [plural, name, sub] => target(find(plural)?, None, Some(name), Some(sub)),
            _ => return Err(ApiError::no_route(full_path)),
        };
        if t.resource.namespaced && t.name.is_some() && t.namespace.is_none() {
            return Err(ApiError::no_route(full_path));
        }
        if !t.resource.namespaced && t.namespace.is_some() {
            return Err(ApiError::no_route(full_path));
        }
        Ok(t)
    }

    /// The object name; for object requests only.
    pub fn name(&self) -> &str {
        self.name.as_deref().unwrap_or_default()
    }

    /// The storage key of the addressed object.
    pub fn key(&self) -> String {
        self.resource.key(self.namespace.as_deref(), self.name())
    }

    /// The storage prefix of the addressed collection.
    pub fn prefix(&self) -> String {
        self.resource.key_prefix(self.namespace.as_deref())
    }
}

/// Query parameters, as given.
#[derive(Debug, Default)]
pub struct Query(pub HashMap<String, String>);

impl Query {
    /// A parameter's value.
    pub fn get(&self, k: &str) -> Option<&str> {
        self.0.get(k).map(String::as_str)
    }

    /// A boolean parameter (`1`/`true`).
    pub fn flag(&self, k: &str) -> bool {
        matches!(self.get(k), Some("1" | "true" | "True"))
    }

    /// Whether `dryRun=All` was asked for.
    ///
    /// # Errors
    /// 400 for other dryRun values.
    pub fn dry_run(&self) -> ApiResult<bool> {
        match self.get("dryRun") {
            None | Some("") => Ok(false),
            Some("All") => Ok(true),
            Some(other) => Err(ApiError::bad_request(format!(
                "dryRun must be \"All\", not {other:?}"
            ))),
        }
    }

    /// An integer parameter.
    ///
    /// # Errors
    /// 400 when it is not an integer.
    pub fn int(&self, k: &str) -> ApiResult<Option<i64>> {
        self.get(k)
            .filter(|v| !v.is_empty())
            .map(|v| {
                v.parse().map_err(|_| {
                    ApiError::bad_request(format!("{k} must be an integer, not {v:?}"))
                })
            })
            .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_map_to_targets() {
        let t = Target::parse("", "v1", "namespaces/default/pods/web/status", "/").unwrap();
        assert_eq!(
            (
                t.resource.plural,
                t.namespace.as_deref(),
                t.name(),
                t.sub.as_deref()
            ),
            ("pods", Some("default"), "web", Some("status"))
        );
        let t = Target::parse("", "v1", "namespaces/default", "/").unwrap();
        assert_eq!((t.resource.plural, t.name()), ("namespaces", "default"));
        let t = Target::parse("", "v1", "namespaces/default/status", "/").unwrap();
        assert_eq!(
            (t.resource.plural, t.name(), t.sub.as_deref()),
            ("namespaces", "default", Some("status"))
        );
        let t = Target::parse("", "v1", "pods", "/").unwrap();
        assert!(t.namespace.is_none() && t.name.is_none());
        let t = Target::parse("apps", "v1", "namespaces/x/deployments", "/").unwrap();
        assert_eq!(t.resource.kind, "Deployment");
        assert!(Target::parse("", "v1", "bogus", "/").is_err());
        // A namespaced object needs its namespace; a cluster object has none.
        assert!(Target::parse("", "v1", "pods/web", "/").is_err());
        assert!(Target::parse("", "v1", "namespaces/x/nodes/n", "/").is_err());
    }
}
