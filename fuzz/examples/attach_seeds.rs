//! Writes the seed corpus of the `attach` target: the header and peer table of real
//! segments (the fuzz configurations, the default and the smallest), with the
//! selector that maps them at their full size, plus variants with entries in every
//! peer state. Run from `fuzz/`: `cargo run --example attach_seeds`.

use std::sync::atomic::Ordering;

use shm_primitives::{PeerId, SegmentConfig, SlotClasses};
use shmhub_fuzz::heap_segment;

fn main() -> std::io::Result<()> {
    let dir = std::path::Path::new("corpus/attach");
    std::fs::create_dir_all(dir)?;
    let mut configs: Vec<(String, SegmentConfig)> = (0..4)
        .map(|i| (format!("fuzz{i}"), shmhub_fuzz::config(i)))
        .collect();
    configs.push(("default".into(), SegmentConfig::default()));
    configs.push((
        "smallest".into(),
        SegmentConfig {
            max_guests: 1,
            ring_capacity: 2,
            classes: SlotClasses::single(64, 1),
            broadcast_slots: 0,
            broadcast_slot_size: 0,
        },
    ));
    for (name, config) in configs {
        let seg = heap_segment(config);
        let layout = seg.layout();
        let shown = (layout.peer_table_offset + layout.peer_table_len) as usize;
        let region = seg.backing().region();
        let mut bytes = Vec::new();
        region.copy_out_to_vec(0, shown, &mut bytes);
        let selector = (1u32 << 31).to_le_bytes();
        std::fs::write(
            dir.join(format!("seed-{name}")),
            [&selector[..], &bytes].concat(),
        )?;
        // Every entry in a different state: Empty, Reserved, Attached, Goodbye, none.
        for index in 0..config.max_guests as usize {
            let id = PeerId::from_index(index).unwrap();
            let word = (index as u64 % 5) | (7 << 32);
            seg.peer(id)
                .unwrap()
                .state_word
                .store(word, Ordering::Relaxed);
        }
        region.copy_out_to_vec(0, shown, &mut bytes);
        std::fs::write(
            dir.join(format!("seed-{name}-states")),
            [&selector[..], &bytes].concat(),
        )?;
    }
    Ok(())
}
