//! The commands besides `run`: each a function `main` dispatches to.

pub mod demo;
pub mod dump;
pub mod group;
pub mod migrate;
pub mod rebuild;
pub mod set_position;
