//! `blockmesh-nbd`: an NBD protocol server for any export behind a trait.
#![forbid(unsafe_code)]
