//! Command flags (`NBD_CMD_FLAG_*`, spec "Request message" / "Command
//! flags"), typed so they cannot be confused with transmission flags
//! (`NBD_FLAG_*`) or reply flags, which are also 16-bit numbers.

use std::fmt;
use std::ops::{BitOr, BitOrAssign};

use crate::consts::cmd_flags as cf;

/// The flags of one request, passed to [`crate::Connection::read`],
/// [`crate::Connection::write`] and the other commands.
///
/// Use [`CmdFlags::empty`] for none, combine the constants with `|`, and
/// [`CmdFlags::from_bits`] when the flags come as a raw number (for example
/// from a libnbd-style API). Unknown bits are kept: strict mode
/// ([`crate::Strict::FLAGS`]) refuses them, and with it switched off they
/// are sent as given.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct CmdFlags(u16);

impl CmdFlags {
    /// `NBD_CMD_FLAG_FUA`: force unit access (writes, trims, write zeroes).
    pub const FUA: CmdFlags = CmdFlags(cf::FUA);
    /// `NBD_CMD_FLAG_NO_HOLE`: write zeroes must allocate.
    pub const NO_HOLE: CmdFlags = CmdFlags(cf::NO_HOLE);
    /// `NBD_CMD_FLAG_DF`: a read answered in one content chunk.
    pub const DF: CmdFlags = CmdFlags(cf::DF);
    /// `NBD_CMD_FLAG_REQ_ONE`: block status answered with one extent.
    pub const REQ_ONE: CmdFlags = CmdFlags(cf::REQ_ONE);
    /// `NBD_CMD_FLAG_FAST_ZERO`: write zeroes only if it is fast.
    pub const FAST_ZERO: CmdFlags = CmdFlags(cf::FAST_ZERO);
    /// `NBD_CMD_FLAG_PAYLOAD_LEN`: with extended headers, the length field
    /// is the payload's length (set automatically unless strict mode's
    /// [`crate::Strict::AUTO_FLAG`] is off).
    pub const PAYLOAD_LEN: CmdFlags = CmdFlags(cf::PAYLOAD_LEN);

    /// No flag: what most requests use.
    pub const fn empty() -> CmdFlags {
        CmdFlags(0)
    }

    /// Flags from their wire value, unknown bits included.
    pub const fn from_bits(bits: u16) -> CmdFlags {
        CmdFlags(bits)
    }

    /// The wire value.
    pub const fn bits(self) -> u16 {
        self.0
    }

    /// True if every flag in `other` is set.
    pub const fn contains(self, other: CmdFlags) -> bool {
        self.0 & other.0 == other.0
    }

    /// True if no flag is set.
    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }
}

impl BitOr for CmdFlags {
    type Output = CmdFlags;
    fn bitor(self, rhs: CmdFlags) -> CmdFlags {
        CmdFlags(self.0 | rhs.0)
    }
}

impl BitOrAssign for CmdFlags {
    fn bitor_assign(&mut self, rhs: CmdFlags) {
        self.0 |= rhs.0;
    }
}

impl fmt::Debug for CmdFlags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const NAMES: [(u16, &str); 6] = [
            (cf::FUA, "FUA"),
            (cf::NO_HOLE, "NO_HOLE"),
            (cf::DF, "DF"),
            (cf::REQ_ONE, "REQ_ONE"),
            (cf::FAST_ZERO, "FAST_ZERO"),
            (cf::PAYLOAD_LEN, "PAYLOAD_LEN"),
        ];
        f.write_str("CmdFlags(")?;
        let mut rest = self.0;
        let mut first = true;
        for (bit, name) in NAMES {
            if rest & bit != 0 {
                if !first {
                    f.write_str(" | ")?;
                }
                f.write_str(name)?;
                rest &= !bit;
                first = false;
            }
        }
        if rest != 0 {
            if !first {
                f.write_str(" | ")?;
            }
            write!(f, "{rest:#x}")?;
            first = false;
        }
        if first {
            f.write_str("empty")?;
        }
        f.write_str(")")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn combine_and_show() {
        let f = CmdFlags::FUA | CmdFlags::FAST_ZERO;
        assert_eq!(f.bits(), cf::FUA | cf::FAST_ZERO);
        assert!(f.contains(CmdFlags::FUA));
        assert!(!f.contains(CmdFlags::DF));
        assert!(CmdFlags::empty().is_empty());
        assert_eq!(format!("{f:?}"), "CmdFlags(FUA | FAST_ZERO)");
        assert_eq!(
            format!("{:?}", CmdFlags::from_bits(0x8001)),
            "CmdFlags(FUA | 0x8000)"
        );
        assert_eq!(format!("{:?}", CmdFlags::empty()), "CmdFlags(empty)");
    }
}
