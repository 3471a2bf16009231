//! The image directory as a unit: written privately and published whole ([`publish`]), every
//! file digested into the manifest ([`digest`]), and verified whole before a restore
//! ([`verify`]).

pub mod alongside;
pub mod blocks;
pub mod chain;
pub mod digest;
mod in_order;
pub mod publish;
pub mod reads;
pub mod verify;

pub use publish::{Existing, ImageTarget, PublishError, Staging};
pub use verify::{
    verify_image, verify_image_alone, verify_image_but_pages, ImageError, Thoroughness,
    VerifiedImage,
};
