//! The write verbs (create, put, update, delete), written once for both ways of reaching the
//! store: [`crate::store::Store`] (a member, which proposes or forwards) and
//! [`crate::store::StoreClient`] (another process, which calls a member). Each verb builds its
//! [`crate::store::Command`] and hands it to the type's own
//! `async fn write(&self, op: &'static str, command: Command) -> Result<WriteResult>`, where the
//! two really differ; `Result` is the calling module's alias, so each keeps its error type.

/// Expands to the four write verbs inside an `impl` block of a type with a `write` method as
/// described in the module documentation.
macro_rules! write_verbs {
    ($errors:literal) => {
        /// Create `key` if it does not exist (otherwise
        /// [`crate::store::mvcc::Outcome::AlreadyExists`]).
        ///
        /// # Errors
        #[doc = $errors]
        pub async fn create(
            &self,
            key: impl Into<String>,
            value: impl Into<Vec<u8>>,
        ) -> Result<WriteResult> {
            let (key, value) = (key.into(), value.into());
            self.write("create", Command::Create { key, value }).await
        }

        /// Create or overwrite `key`.
        ///
        /// # Errors
        #[doc = $errors]
        pub async fn put(
            &self,
            key: impl Into<String>,
            value: impl Into<Vec<u8>>,
        ) -> Result<WriteResult> {
            let (key, value) = (key.into(), value.into());
            self.write("put", Command::Put { key, value }).await
        }

        /// Overwrite `key` if it exists and, when `expected` is given, only if its
        /// `mod_revision` is still `expected` (compare-and-swap).
        ///
        /// # Errors
        #[doc = $errors]
        pub async fn update(
            &self,
            key: impl Into<String>,
            value: impl Into<Vec<u8>>,
            expected: Option<Revision>,
        ) -> Result<WriteResult> {
            let (key, value) = (key.into(), value.into());
            let command = Command::Update {
                key,
                value,
                expected,
            };
            self.write("update", command).await
        }

        /// Delete `key`, only if its `mod_revision` is `expected` when given.
        ///
        /// # Errors
        #[doc = $errors]
        pub async fn delete(
            &self,
            key: impl Into<String>,
            expected: Option<Revision>,
        ) -> Result<WriteResult> {
            let key = key.into();
            self.write("delete", Command::Delete { key, expected })
                .await
        }
    };
}

pub(crate) use write_verbs;
