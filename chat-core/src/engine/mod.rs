//! The engine (work in progress stub; replaced by the real engine).
#![allow(missing_docs)]

#[derive(Clone, Debug)]
pub struct Chat;
#[derive(Debug)]
pub struct ChatBuilder;
#[derive(Debug)]
pub struct ChatConfig;
#[derive(Debug)]
pub struct CloseReason;
#[derive(Debug)]
pub struct Outbound;
#[derive(Debug)]
pub struct Session;
