//! The OpenAPI v2 document in the protobuf form client-go asks for
//! (`application/com.github.proto-openapi.spec.v2@v1.0+protobuf`): the `openapi.v2` messages
//! of gnostic's `OpenAPIv2.proto`, declared with `prost` for the parts a Swagger document of
//! ours uses, and filled from the document's JSON.
//!
//! gnostic's `oneof`s are written as plain optional fields: on the wire a oneof member is an
//! ordinary field, so a reader sees the same bytes. Vendor extensions and `default`/`enum`
//! values travel as YAML text (`Any.yaml`); JSON text is valid YAML, so they are sent as JSON.

use prost::Message;
use serde_json::{Map, Value};

/// `openapi.v2.Document`.
#[derive(Clone, PartialEq, Message)]
pub struct Document {
    #[prost(string, tag = "1")]
    pub swagger: String,
    #[prost(message, optional, tag = "2")]
    pub info: Option<Info>,
    #[prost(message, optional, tag = "8")]
    pub paths: Option<Paths>,
    #[prost(message, optional, tag = "9")]
    pub definitions: Option<Definitions>,
}

/// `openapi.v2.Info`.
#[derive(Clone, PartialEq, Message)]
pub struct Info {
    #[prost(string, tag = "1")]
    pub title: String,
    #[prost(string, tag = "2")]
    pub version: String,
}

/// `openapi.v2.Any`: only the YAML form is used.
#[derive(Clone, PartialEq, Message)]
pub struct Any {
    #[prost(string, tag = "2")]
    pub yaml: String,
}

/// `openapi.v2.NamedAny`.
#[derive(Clone, PartialEq, Message)]
pub struct NamedAny {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(message, optional, tag = "2")]
    pub value: Option<Any>,
}

/// `openapi.v2.Paths`.
#[derive(Clone, PartialEq, Message)]
pub struct Paths {
    #[prost(message, repeated, tag = "2")]
    pub path: Vec<NamedPathItem>,
}

/// `openapi.v2.NamedPathItem`.
#[derive(Clone, PartialEq, Message)]
pub struct NamedPathItem {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(message, optional, tag = "2")]
    pub value: Option<PathItem>,
}

/// `openapi.v2.PathItem`.
#[derive(Clone, PartialEq, Message)]
pub struct PathItem {
    #[prost(message, optional, tag = "2")]
    pub get: Option<Operation>,
    #[prost(message, optional, tag = "3")]
    pub put: Option<Operation>,
    #[prost(message, optional, tag = "4")]
    pub post: Option<Operation>,
    #[prost(message, optional, tag = "5")]
    pub delete: Option<Operation>,
    #[prost(message, optional, tag = "8")]
    pub patch: Option<Operation>,
    #[prost(message, repeated, tag = "9")]
    pub parameters: Vec<ParametersItem>,
}

/// `openapi.v2.Operation`.
#[derive(Clone, PartialEq, Message)]
pub struct Operation {
    #[prost(string, repeated, tag = "1")]
    pub tags: Vec<String>,
    #[prost(string, tag = "3")]
    pub description: String,
    #[prost(string, tag = "5")]
    pub operation_id: String,
    #[prost(string, repeated, tag = "6")]
    pub produces: Vec<String>,
    #[prost(string, repeated, tag = "7")]
    pub consumes: Vec<String>,
    #[prost(message, repeated, tag = "8")]
    pub parameters: Vec<ParametersItem>,
    #[prost(message, optional, tag = "9")]
    pub responses: Option<Responses>,
    #[prost(string, repeated, tag = "10")]
    pub schemes: Vec<String>,
    #[prost(message, repeated, tag = "13")]
    pub vendor_extension: Vec<NamedAny>,
}

/// `openapi.v2.ParametersItem` (oneof: parameter).
#[derive(Clone, PartialEq, Message)]
pub struct ParametersItem {
    #[prost(message, optional, tag = "1")]
    pub parameter: Option<Parameter>,
}

/// `openapi.v2.Parameter` (oneof: body or non-body).
#[derive(Clone, PartialEq, Message)]
pub struct Parameter {
    #[prost(message, optional, tag = "1")]
    pub body_parameter: Option<BodyParameter>,
    #[prost(message, optional, tag = "2")]
    pub non_body_parameter: Option<NonBodyParameter>,
}

/// `openapi.v2.BodyParameter`.
#[derive(Clone, PartialEq, Message)]
pub struct BodyParameter {
    #[prost(string, tag = "1")]
    pub description: String,
    #[prost(string, tag = "2")]
    pub name: String,
    #[prost(string, tag = "3")]
    pub r#in: String,
    #[prost(bool, tag = "4")]
    pub required: bool,
    #[prost(message, optional, tag = "5")]
    pub schema: Option<Schema>,
}

/// `openapi.v2.NonBodyParameter` (oneof: query or path here).
#[derive(Clone, PartialEq, Message)]
pub struct NonBodyParameter {
    #[prost(message, optional, tag = "3")]
    pub query_parameter_sub_schema: Option<SimpleParameter>,
    #[prost(message, optional, tag = "4")]
    pub path_parameter_sub_schema: Option<PathParameter>,
}

/// `openapi.v2.QueryParameterSubSchema` (the fields we send).
#[derive(Clone, PartialEq, Message)]
pub struct SimpleParameter {
    #[prost(bool, tag = "1")]
    pub required: bool,
    #[prost(string, tag = "2")]
    pub r#in: String,
    #[prost(string, tag = "3")]
    pub description: String,
    #[prost(string, tag = "4")]
    pub name: String,
    #[prost(string, tag = "6")]
    pub r#type: String,
    #[prost(bool, tag = "20")]
    pub unique_items: bool,
}

/// `openapi.v2.PathParameterSubSchema` (its `type` and `uniqueItems` sit one tag lower than
/// the query parameter's: it has no `allowEmptyValue`).
#[derive(Clone, PartialEq, Message)]
pub struct PathParameter {
    #[prost(bool, tag = "1")]
    pub required: bool,
    #[prost(string, tag = "2")]
    pub r#in: String,
    #[prost(string, tag = "3")]
    pub description: String,
    #[prost(string, tag = "4")]
    pub name: String,
    #[prost(string, tag = "5")]
    pub r#type: String,
    #[prost(bool, tag = "19")]
    pub unique_items: bool,
}

/// `openapi.v2.Responses`.
#[derive(Clone, PartialEq, Message)]
pub struct Responses {
    #[prost(message, repeated, tag = "1")]
    pub response_code: Vec<NamedResponseValue>,
}

/// `openapi.v2.NamedResponseValue`.
#[derive(Clone, PartialEq, Message)]
pub struct NamedResponseValue {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(message, optional, tag = "2")]
    pub value: Option<ResponseValue>,
}

/// `openapi.v2.ResponseValue` (oneof: response).
#[derive(Clone, PartialEq, Message)]
pub struct ResponseValue {
    #[prost(message, optional, tag = "1")]
    pub response: Option<Response>,
}

/// `openapi.v2.Response`.
#[derive(Clone, PartialEq, Message)]
pub struct Response {
    #[prost(string, tag = "1")]
    pub description: String,
    #[prost(message, optional, tag = "2")]
    pub schema: Option<SchemaItem>,
}

/// `openapi.v2.SchemaItem` (oneof: schema).
#[derive(Clone, PartialEq, Message)]
pub struct SchemaItem {
    #[prost(message, optional, tag = "1")]
    pub schema: Option<Schema>,
}

/// `openapi.v2.Definitions`.
#[derive(Clone, PartialEq, Message)]
pub struct Definitions {
    #[prost(message, repeated, tag = "1")]
    pub additional_properties: Vec<NamedSchema>,
}

/// `openapi.v2.NamedSchema`.
#[derive(Clone, PartialEq, Message)]
pub struct NamedSchema {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(message, optional, tag = "2")]
    pub value: Option<Schema>,
}

/// `openapi.v2.Properties`.
#[derive(Clone, PartialEq, Message)]
pub struct Properties {
    #[prost(message, repeated, tag = "1")]
    pub additional_properties: Vec<NamedSchema>,
}

/// `openapi.v2.TypeItem`.
#[derive(Clone, PartialEq, Message)]
pub struct TypeItem {
    #[prost(string, repeated, tag = "1")]
    pub value: Vec<String>,
}

/// `openapi.v2.ItemsItem`.
#[derive(Clone, PartialEq, Message)]
pub struct ItemsItem {
    #[prost(message, repeated, tag = "1")]
    pub schema: Vec<Schema>,
}

/// `openapi.v2.AdditionalPropertiesItem` (oneof: schema or boolean).
#[derive(Clone, PartialEq, Message)]
pub struct AdditionalPropertiesItem {
    #[prost(message, optional, boxed, tag = "1")]
    pub schema: Option<Box<Schema>>,
    #[prost(bool, optional, tag = "2")]
    pub boolean: Option<bool>,
}

/// `openapi.v2.Schema`.
#[derive(Clone, PartialEq, Message)]
pub struct Schema {
    #[prost(string, tag = "1")]
    pub r#ref: String,
    #[prost(string, tag = "2")]
    pub format: String,
    #[prost(string, tag = "3")]
    pub title: String,
    #[prost(string, tag = "4")]
    pub description: String,
    #[prost(message, optional, tag = "5")]
    pub default: Option<Any>,
    #[prost(double, tag = "7")]
    pub maximum: f64,
    #[prost(double, tag = "9")]
    pub minimum: f64,
    #[prost(int64, tag = "11")]
    pub max_length: i64,
    #[prost(int64, tag = "12")]
    pub min_length: i64,
    #[prost(string, tag = "13")]
    pub pattern: String,
    #[prost(int64, tag = "14")]
    pub max_items: i64,
    #[prost(int64, tag = "15")]
    pub min_items: i64,
    #[prost(bool, tag = "16")]
    pub unique_items: bool,
    #[prost(string, repeated, tag = "19")]
    pub required: Vec<String>,
    #[prost(message, repeated, tag = "20")]
    pub r#enum: Vec<Any>,
    #[prost(message, optional, tag = "21")]
    pub additional_properties: Option<AdditionalPropertiesItem>,
    #[prost(message, optional, tag = "22")]
    pub r#type: Option<TypeItem>,
    #[prost(message, optional, tag = "23")]
    pub items: Option<ItemsItem>,
    #[prost(message, repeated, tag = "24")]
    pub all_of: Vec<Schema>,
    #[prost(message, optional, tag = "25")]
    pub properties: Option<Properties>,
    #[prost(bool, tag = "27")]
    pub read_only: bool,
    #[prost(message, repeated, tag = "31")]
    pub vendor_extension: Vec<NamedAny>,
}

fn text(v: &Value, key: &str) -> String {
    v.get(key)
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned()
}

fn strings(v: &Value, key: &str) -> Vec<String> {
    v.get(key)
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

fn any(v: &Value) -> Any {
    Any {
        yaml: v.to_string(),
    }
}

/// The `x-…` members of an object, as gnostic keeps them.
fn extensions(v: &Value) -> Vec<NamedAny> {
    v.as_object()
        .into_iter()
        .flatten()
        .filter(|(k, _)| k.starts_with("x-"))
        .map(|(k, v)| NamedAny {
            name: k.clone(),
            value: Some(any(v)),
        })
        .collect()
}

fn named_schemas(m: Option<&Map<String, Value>>) -> Vec<NamedSchema> {
    m.into_iter()
        .flatten()
        .map(|(name, s)| NamedSchema {
            name: name.clone(),
            value: Some(schema(s)),
        })
        .collect()
}

/// A Swagger 2.0 schema object.
pub fn schema(v: &Value) -> Schema {
    let num = |k: &str| v.get(k).and_then(Value::as_f64).unwrap_or_default();
    let int = |k: &str| v.get(k).and_then(Value::as_i64).unwrap_or_default();
    let kind = match v.get("type") {
        Some(Value::String(t)) => Some(TypeItem {
            value: vec![t.clone()],
        }),
        Some(Value::Array(ts)) => Some(TypeItem {
            value: ts
                .iter()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect(),
        }),
        _ => None,
    };
    let items = match v.get("items") {
        Some(Value::Array(all)) => Some(ItemsItem {
            schema: all.iter().map(schema).collect(),
        }),
        Some(one @ Value::Object(_)) => Some(ItemsItem {
            schema: vec![schema(one)],
        }),
        _ => None,
    };
    let additional_properties = match v.get("additionalProperties") {
        Some(Value::Bool(b)) => Some(AdditionalPropertiesItem {
            schema: None,
            boolean: Some(*b),
        }),
        Some(s @ Value::Object(_)) => Some(AdditionalPropertiesItem {
            schema: Some(Box::new(schema(s))),
            boolean: None,
        }),
        _ => None,
    };
    Schema {
        r#ref: text(v, "$ref"),
        format: text(v, "format"),
        title: text(v, "title"),
        description: text(v, "description"),
        default: v.get("default").map(any),
        maximum: num("maximum"),
        minimum: num("minimum"),
        max_length: int("maxLength"),
        min_length: int("minLength"),
        pattern: text(v, "pattern"),
        max_items: int("maxItems"),
        min_items: int("minItems"),
        unique_items: v.get("uniqueItems") == Some(&Value::Bool(true)),
        required: strings(v, "required"),
        r#enum: v
            .get("enum")
            .and_then(Value::as_array)
            .map(|e| e.iter().map(any).collect())
            .unwrap_or_default(),
        additional_properties,
        r#type: kind,
        items,
        all_of: v
            .get("allOf")
            .and_then(Value::as_array)
            .map(|a| a.iter().map(schema).collect())
            .unwrap_or_default(),
        properties: v
            .get("properties")
            .and_then(Value::as_object)
            .map(|p| Properties {
                additional_properties: named_schemas(Some(p)),
            }),
        read_only: v.get("readOnly") == Some(&Value::Bool(true)),
        vendor_extension: extensions(v),
    }
}

fn parameter(p: &Value) -> ParametersItem {
    let parameter = match p.get("in").and_then(Value::as_str) {
        Some("body") => Parameter {
            body_parameter: Some(BodyParameter {
                description: text(p, "description"),
                name: text(p, "name"),
                r#in: "body".into(),
                required: p.get("required") == Some(&Value::Bool(true)),
                schema: p.get("schema").map(schema),
            }),
            non_body_parameter: None,
        },
        Some("path") => Parameter {
            body_parameter: None,
            non_body_parameter: Some(NonBodyParameter {
                query_parameter_sub_schema: None,
                path_parameter_sub_schema: Some(PathParameter {
                    required: true,
                    r#in: "path".into(),
                    description: text(p, "description"),
                    name: text(p, "name"),
                    r#type: text(p, "type"),
                    unique_items: p.get("uniqueItems") == Some(&Value::Bool(true)),
                }),
            }),
        },
        _ => Parameter {
            body_parameter: None,
            non_body_parameter: Some(NonBodyParameter {
                query_parameter_sub_schema: Some(SimpleParameter {
                    required: p.get("required") == Some(&Value::Bool(true)),
                    r#in: "query".into(),
                    description: text(p, "description"),
                    name: text(p, "name"),
                    r#type: text(p, "type"),
                    unique_items: p.get("uniqueItems") == Some(&Value::Bool(true)),
                }),
                path_parameter_sub_schema: None,
            }),
        },
    };
    ParametersItem {
        parameter: Some(parameter),
    }
}

fn parameters(v: &Value) -> Vec<ParametersItem> {
    v.get("parameters")
        .and_then(Value::as_array)
        .map(|ps| ps.iter().map(parameter).collect())
        .unwrap_or_default()
}

fn operation(op: Option<&Value>) -> Option<Operation> {
    let op = op?;
    let responses = op
        .get("responses")
        .and_then(Value::as_object)
        .map(|codes| Responses {
            response_code: codes
                .iter()
                .map(|(code, r)| NamedResponseValue {
                    name: code.clone(),
                    value: Some(ResponseValue {
                        response: Some(Response {
                            description: text(r, "description"),
                            schema: r.get("schema").map(|s| SchemaItem {
                                schema: Some(schema(s)),
                            }),
                        }),
                    }),
                })
                .collect(),
        });
    Some(Operation {
        tags: strings(op, "tags"),
        description: text(op, "description"),
        operation_id: text(op, "operationId"),
        produces: strings(op, "produces"),
        consumes: strings(op, "consumes"),
        parameters: parameters(op),
        responses,
        schemes: strings(op, "schemes"),
        vendor_extension: extensions(op),
    })
}

/// Encodes a Swagger 2.0 document (JSON) as gnostic protobuf.
pub fn encode(doc: &Value) -> Vec<u8> {
    let paths = doc
        .get("paths")
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
        .map(|(name, item)| NamedPathItem {
            name: name.clone(),
            value: Some(PathItem {
                get: operation(item.get("get")),
                put: operation(item.get("put")),
                post: operation(item.get("post")),
                delete: operation(item.get("delete")),
                patch: operation(item.get("patch")),
                parameters: parameters(item),
            }),
        })
        .collect();
    Document {
        swagger: text(doc, "swagger"),
        info: doc.get("info").map(|i| Info {
            title: text(i, "title"),
            version: text(i, "version"),
        }),
        paths: Some(Paths { path: paths }),
        definitions: Some(Definitions {
            additional_properties: named_schemas(doc.get("definitions").and_then(Value::as_object)),
        }),
    }
    .encode_to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn schemas_keep_refs_types_maps_and_extensions() {
        let s = schema(&json!({
            "type": "object",
            "description": "d",
            "required": ["spec"],
            "properties": {
                "spec": {"$ref": "#/definitions/Spec", "description": "the spec"},
                "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                "args": {"type": "array", "items": {"type": "string"}},
            },
            "x-kubernetes-group-version-kind": [{"group": "", "version": "v1", "kind": "Pod"}],
        }));
        let bytes = s.encode_to_vec();
        let back = Schema::decode(bytes.as_slice()).unwrap();
        assert_eq!(back.r#type.unwrap().value, ["object"]);
        assert_eq!(back.required, ["spec"]);
        let props = back.properties.unwrap().additional_properties;
        let by_name = |n: &str| {
            props
                .iter()
                .find(|p| p.name == n)
                .unwrap()
                .value
                .clone()
                .unwrap()
        };
        assert_eq!(by_name("spec").r#ref, "#/definitions/Spec");
        assert_eq!(by_name("spec").description, "the spec");
        let labels = by_name("labels").additional_properties.unwrap();
        assert_eq!(labels.schema.unwrap().r#type.unwrap().value, ["string"]);
        assert_eq!(
            by_name("args").items.unwrap().schema[0]
                .r#type
                .clone()
                .unwrap()
                .value,
            ["string"]
        );
        let ext = &back.vendor_extension[0];
        assert_eq!(ext.name, "x-kubernetes-group-version-kind");
        let yaml: Value = serde_norway::from_str(&ext.value.as_ref().unwrap().yaml).unwrap();
        assert_eq!(yaml[0]["kind"], "Pod");
    }

    #[test]
    fn boolean_additional_properties_survive_when_false() {
        let s = schema(&json!({"type": "object", "additionalProperties": false}));
        let back = Schema::decode(s.encode_to_vec().as_slice()).unwrap();
        assert_eq!(back.additional_properties.unwrap().boolean, Some(false));
    }
}
