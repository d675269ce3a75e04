//! placeholder
/// x
pub const DEFAULT_READ_AHEAD: usize = 256 * 1024;
/// x
pub struct NbdFile;
