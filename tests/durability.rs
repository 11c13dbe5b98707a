//! placeholder

mod common;
