//! strata-image: storage backends, qcow2 and raw images, backing chains.
pub mod lock;
