//! The names a spawn ticket uses on the command line and in the environment
//! (`shm.spawn.ticket`). The host renders them; the guest parses them.

/// Argument naming the segment file.
pub const ARG_HUB_PATH: &str = "--hub-path";
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
/// Environment variable naming the reserved peer id.
pub const ENV_PEER_ID: &str = "SHMHUB_PEER_ID";
/// Environment variable naming the generation of the reservation.
pub const ENV_PEER_GENERATION: &str = "SHMHUB_PEER_GENERATION";
/// Environment variable naming the inherited doorbell descriptor.
pub const ENV_DOORBELL_FD: &str = "SHMHUB_DOORBELL_FD";
/// Environment variable naming the attach timeout in milliseconds.
pub const ENV_ATTACH_TIMEOUT_MS: &str = "SHMHUB_ATTACH_TIMEOUT_MS";

/// `(argument, environment variable)` pairs, in the order tickets render them.
pub const FIELDS: [(&str, &str); 5] = [
    (ARG_HUB_PATH, ENV_HUB_PATH),
    (ARG_PEER_ID, ENV_PEER_ID),
    (ARG_PEER_GENERATION, ENV_PEER_GENERATION),
    (ARG_DOORBELL_FD, ENV_DOORBELL_FD),
    (ARG_ATTACH_TIMEOUT_MS, ENV_ATTACH_TIMEOUT_MS),
];
