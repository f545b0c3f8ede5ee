//! The names a spawn ticket uses on the command line and in the environment
//! (`shm.spawn.ticket`), and the record that carries a ticket over a Unix socket
//! (`shm.fd.passing`). The host renders them; the guest parses them.

/// Argument naming the segment file.
pub const ARG_HUB_PATH: &str = "--hub-path";
/// Argument naming the inherited descriptor of a sealed segment.
pub const ARG_HUB_FD: &str = "--hub-fd";
/// Argument naming the reserved peer id.
pub const ARG_PEER_ID: &str = "--peer-id";
/// Argument naming the generation of the reservation.
pub const ARG_PEER_GENERATION: &str = "--peer-generation";
/// Argument naming the inherited doorbell descriptor.
pub const ARG_DOORBELL_FD: &str = "--doorbell-fd";
/// Argument naming the attach timeout in milliseconds.
pub const ARG_ATTACH_TIMEOUT_MS: &str = "--attach-timeout-ms";

/// Environment variable naming the segment file.
pub const ENV_HUB_PATH: &str = "SHMHUB_HUB_PATH";
/// Environment variable naming the inherited descriptor of a sealed segment.
pub const ENV_HUB_FD: &str = "SHMHUB_HUB_FD";
/// Environment variable naming the reserved peer id.
pub const ENV_PEER_ID: &str = "SHMHUB_PEER_ID";
/// Environment variable naming the generation of the reservation.
pub const ENV_PEER_GENERATION: &str = "SHMHUB_PEER_GENERATION";
/// Environment variable naming the inherited doorbell descriptor.
pub const ENV_DOORBELL_FD: &str = "SHMHUB_DOORBELL_FD";
/// Environment variable naming the attach timeout in milliseconds.
pub const ENV_ATTACH_TIMEOUT_MS: &str = "SHMHUB_ATTACH_TIMEOUT_MS";

/// `(argument, environment variable)` pairs, in the order tickets render them. A
/// ticket renders exactly one of the first two.
pub const FIELDS: [(&str, &str); 6] = [
    (ARG_HUB_PATH, ENV_HUB_PATH),
    (ARG_HUB_FD, ENV_HUB_FD),
    (ARG_PEER_ID, ENV_PEER_ID),
    (ARG_PEER_GENERATION, ENV_PEER_GENERATION),
    (ARG_DOORBELL_FD, ENV_DOORBELL_FD),
    (ARG_ATTACH_TIMEOUT_MS, ENV_ATTACH_TIMEOUT_MS),
];

/// Index in [`FIELDS`] of the segment path.
pub const HUB_PATH: usize = 0;
/// Index in [`FIELDS`] of the segment descriptor.
pub const HUB_FD: usize = 1;
/// Index in [`FIELDS`] of the peer id.
pub const PEER_ID: usize = 2;
/// Index in [`FIELDS`] of the generation.
pub const PEER_GENERATION: usize = 3;
/// Index in [`FIELDS`] of the doorbell descriptor.
pub const DOORBELL_FD: usize = 4;
/// Index in [`FIELDS`] of the attach timeout.
pub const ATTACH_TIMEOUT_MS: usize = 5;

/// The `magic` of a ticket record: `b"SHMTICKT"` read as a little-endian `u64`.
pub const RECORD_MAGIC: u64 = u64::from_le_bytes(*b"SHMTICKT");
/// Bytes in a ticket record.
pub const RECORD_LEN: usize = 24;
/// Descriptors that travel with a ticket record: the segment's, then the doorbell.
pub const RECORD_FDS: usize = 2;

/// The data of the one message that carries a ticket over a Unix socket
/// (`shm.fd.passing`); its descriptors travel beside it. Fields are raw: the guest
/// validates them as it validates a rendered ticket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TicketRecord {
    /// The reserved peer id (valid: 1–255).
    pub peer_id: u32,
    /// The reservation's generation.
    pub generation: u32,
    /// The attach timeout in milliseconds.
    pub attach_timeout_ms: u32,
}

impl TicketRecord {
    /// Little-endian: magic, peer id, generation, timeout, four zero bytes.
    pub fn encode(&self) -> [u8; RECORD_LEN] {
        let mut out = [0u8; RECORD_LEN];
        out[..8].copy_from_slice(&RECORD_MAGIC.to_le_bytes());
        out[8..12].copy_from_slice(&self.peer_id.to_le_bytes());
        out[12..16].copy_from_slice(&self.generation.to_le_bytes());
        out[16..20].copy_from_slice(&self.attach_timeout_ms.to_le_bytes());
        out
    }

    /// The record in `bytes`, or `None` unless they are exactly one record with the
    /// right magic and zero reserved bytes.
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        let bytes: &[u8; RECORD_LEN] = bytes.try_into().ok()?;
        let u32_at = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4"));
        let magic = u64::from_le_bytes(bytes[..8].try_into().expect("8"));
        (magic == RECORD_MAGIC && u32_at(20) == 0).then(|| Self {
            peer_id: u32_at(8),
            generation: u32_at(12),
            attach_timeout_ms: u32_at(16),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_round_trips_and_anything_else_is_refused() {
        let r = TicketRecord {
            peer_id: 7,
            generation: 0xDEAD_BEEF,
            attach_timeout_ms: 5000,
        };
        let bytes = r.encode();
        assert_eq!(&bytes[..8], b"SHMTICKT");
        assert_eq!(&bytes[8..12], &[7, 0, 0, 0]);
        assert_eq!(TicketRecord::decode(&bytes), Some(r));
        assert_eq!(TicketRecord::decode(&bytes[..23]), None, "short");
        let mut long = bytes.to_vec();
        long.push(0);
        assert_eq!(TicketRecord::decode(&long), None, "long");
        let mut bad = bytes;
        bad[0] ^= 1;
        assert_eq!(TicketRecord::decode(&bad), None, "magic");
        let mut bad = bytes;
        bad[23] = 1;
        assert_eq!(TicketRecord::decode(&bad), None, "reserved");
    }
}
