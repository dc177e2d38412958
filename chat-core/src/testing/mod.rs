//! Conformance suites (feature `testing`): every backend of a part must pass its suite.
//!
//! Each suite is a set of plain `pub async fn` cases over a `&dyn Trait` plus a macro that
//! expands them into one `#[tokio::test]` per case, so a failure names the case and the backend.

pub mod converge;
pub mod presence;
pub mod router;
pub mod store;
pub mod stream;
