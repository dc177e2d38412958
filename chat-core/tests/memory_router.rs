//! The router conformance suite against [`MemoryRouterHub`].

use std::sync::Arc;

use chat_core::NodeId;
use chat_core::memory::MemoryRouterHub;
use chat_core::router::DynRouter;

chat_core::router_conformance_tests!(|nodes: Vec<NodeId>| async move {
    let hub = MemoryRouterHub::new();
    nodes
        .into_iter()
        .map(|node| Arc::new(hub.router(node)) as DynRouter)
        .collect::<Vec<_>>()
});

/// The same suite through the `with_guard` form: the hub is handed back as the guard (the
/// routers of a hub keep working while it lives).
mod with_guard {
    use super::*;

    chat_core::router_conformance_tests!(with_guard, |nodes: Vec<NodeId>| async move {
        let hub = MemoryRouterHub::new();
        let routers = nodes
            .into_iter()
            .map(|node| Arc::new(hub.router(node)) as DynRouter)
            .collect::<Vec<_>>();
        (routers, hub)
    });
}
