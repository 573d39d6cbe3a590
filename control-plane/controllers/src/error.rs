//! The crate's error type.

/// What went wrong in a controller or the scheduler.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A request to the API server failed.
    #[error("{what}: {source}")]
    Api {
        /// What was being done.
        what: String,
        /// The client's error.
        #[source]
        source: kube::Error,
    },
    /// An object could not be encoded.
    #[error("encoding {what}: {source}")]
    Encode {
        /// What was being encoded.
        what: String,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
    /// The API server cannot be reached.
    #[error("connecting to the API server with {0}")]
    Connect(String),
    /// An option is invalid.
    #[error("invalid option: {0}")]
    Option(String),
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Adds context to a client error.
pub(crate) trait ApiContext<T> {
    /// Wraps the error with what was being done.
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T> ApiContext<T> for Result<T, kube::Error> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| Error::Api {
            what: what(),
            source,
        })
    }
}

impl Error {
    /// The API's status code, if the server answered with one.
    pub fn code(&self) -> Option<u16> {
        match self {
            Error::Api {
                source: kube::Error::Api(s),
                ..
            } => Some(s.code),
            _ => None,
        }
    }

    /// A 409 Conflict: another writer changed the object first.
    pub fn is_conflict(&self) -> bool {
        self.code() == Some(409)
    }

    /// A 404: the object is gone.
    pub fn is_not_found(&self) -> bool {
        self.code() == Some(404)
    }
}
