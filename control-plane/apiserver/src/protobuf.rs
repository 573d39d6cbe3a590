//! The few Kubernetes protobuf messages kubectl sends where it uses typed clients (today:
//! `SelfSubjectAccessReview`, for `kubectl auth can-i`).
//!
//! Kubernetes' protobuf wire format is the 4-byte magic `k8s\0` followed by a
//! `runtime.Unknown` envelope whose `raw` field holds the object's message. The messages are
//! declared here with `prost` field numbers from Kubernetes' `generated.proto` files; general
//! protobuf support for every served type is not implemented (those requests get 415).

use prost::Message;

/// The magic prefix of Kubernetes protobuf bodies.
const MAGIC: &[u8] = b"k8s\0";

/// `runtime.TypeMeta`.
#[derive(Clone, PartialEq, Message)]
pub struct TypeMeta {
    /// apiVersion
    #[prost(string, optional, tag = "1")]
    pub api_version: Option<String>,
    /// kind
    #[prost(string, optional, tag = "2")]
    pub kind: Option<String>,
}

/// `runtime.Unknown`: the envelope of every protobuf object.
#[derive(Clone, PartialEq, Message)]
pub struct Unknown {
    /// The object's type.
    #[prost(message, optional, tag = "1")]
    pub type_meta: Option<TypeMeta>,
    /// The object's own message.
    #[prost(bytes = "vec", optional, tag = "2")]
    pub raw: Option<Vec<u8>>,
}

/// `authorization.v1.ResourceAttributes`.
#[derive(Clone, PartialEq, Message)]
pub struct ResourceAttributes {
    /// namespace
    #[prost(string, optional, tag = "1")]
    pub namespace: Option<String>,
    /// verb
    #[prost(string, optional, tag = "2")]
    pub verb: Option<String>,
    /// group
    #[prost(string, optional, tag = "3")]
    pub group: Option<String>,
    /// version
    #[prost(string, optional, tag = "4")]
    pub version: Option<String>,
    /// resource
    #[prost(string, optional, tag = "5")]
    pub resource: Option<String>,
    /// subresource
    #[prost(string, optional, tag = "6")]
    pub subresource: Option<String>,
    /// name
    #[prost(string, optional, tag = "7")]
    pub name: Option<String>,
}

/// `authorization.v1.SelfSubjectAccessReviewSpec`.
#[derive(Clone, PartialEq, Message)]
pub struct SelfSubjectAccessReviewSpec {
    /// resourceAttributes
    #[prost(message, optional, tag = "1")]
    pub resource_attributes: Option<ResourceAttributes>,
}

/// `authorization.v1.SelfSubjectAccessReview` (metadata and status are not needed).
#[derive(Clone, PartialEq, Message)]
pub struct SelfSubjectAccessReview {
    /// spec
    #[prost(message, optional, tag = "2")]
    pub spec: Option<SelfSubjectAccessReviewSpec>,
}

/// Whether a body is Kubernetes protobuf.
pub fn is_protobuf(content_type: Option<&str>) -> bool {
    content_type.is_some_and(|ct| ct.starts_with("application/vnd.kubernetes.protobuf"))
}

/// Decodes a protobuf `SelfSubjectAccessReview` into its JSON form.
///
/// # Errors
/// The body is not a Kubernetes protobuf envelope holding one.
pub fn self_subject_access_review(body: &[u8]) -> Result<serde_json::Value, String> {
    let inner = body
        .strip_prefix(MAGIC)
        .ok_or("missing the k8s protobuf magic")?;
    let unknown = Unknown::decode(inner).map_err(|e| e.to_string())?;
    let raw = unknown.raw.unwrap_or_default();
    let review = SelfSubjectAccessReview::decode(raw.as_slice()).map_err(|e| e.to_string())?;
    let attrs = review
        .spec
        .and_then(|s| s.resource_attributes)
        .unwrap_or_default();
    Ok(serde_json::json!({
        "apiVersion": "authorization.k8s.io/v1",
        "kind": "SelfSubjectAccessReview",
        "metadata": {},
        "spec": {"resourceAttributes": {
            "namespace": attrs.namespace, "verb": attrs.verb, "group": attrs.group,
            "version": attrs.version, "resource": attrs.resource,
            "subresource": attrs.subresource, "name": attrs.name,
        }},
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_an_enveloped_review() {
        let review = SelfSubjectAccessReview {
            spec: Some(SelfSubjectAccessReviewSpec {
                resource_attributes: Some(ResourceAttributes {
                    verb: Some("list".into()),
                    resource: Some("pods".into()),
                    namespace: Some("default".into()),
                    ..Default::default()
                }),
            }),
        };
        let envelope = Unknown {
            type_meta: Some(TypeMeta {
                api_version: Some("authorization.k8s.io/v1".into()),
                kind: Some("SelfSubjectAccessReview".into()),
            }),
            raw: Some(review.encode_to_vec()),
        };
        let mut body = MAGIC.to_vec();
        body.extend(envelope.encode_to_vec());
        let json = self_subject_access_review(&body).unwrap();
        assert_eq!(json["spec"]["resourceAttributes"]["verb"], "list");
        assert_eq!(json["spec"]["resourceAttributes"]["resource"], "pods");
        assert!(self_subject_access_review(b"{}").is_err());
    }
}
