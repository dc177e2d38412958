//! In-process router hub (stub, to be written).

/// Hub.
#[derive(Debug, Default)]
pub struct MemoryRouterHub;
/// Router of one node.
#[derive(Debug, Default)]
pub struct MemoryRouter;
